"""Write generated clips as a PhysicalAI-AV snapshot inside a Hugging Face hub cache.

Layout (dataset.md §2, §7): <cache_dir>/datasets--nvidia--PhysicalAI-Autonomous-Vehicles/
  refs/main                                  the revision (so "main" resolves too)
  snapshots/<revision>/
    features.csv, clip_index.parquet
    metadata/feature_presence.parquet, metadata/data_collection.parquet
    camera/<cam>/<cam>.chunk_NNNN.zip         <clip>.<cam>.mp4 + <clip>.<cam>.timestamps.parquet
    labels/egomotion/egomotion.chunk_NNNN.zip <clip>.egomotion.parquet (100 Hz)
    calibration/{camera_intrinsics,sensor_extrinsics,vehicle_dimensions}/*.chunk_NNNN.parquet
    labels/coc/<clip>.coc.parquet             reasoning labels (not a devkit feature)
The devkit opens it with HF_HUB_OFFLINE=1, PhysicalAIAVDatasetInterface(revision, cache_dir=cache_dir).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import time
import uuid
import zipfile

import numpy as np
import pandas as pd

from . import scenario as sc
from .camera import CAMERA_NAMES, default_rig
from .labels import clip_labels
from .render import CameraRenderer, GroundTexture, scene_boxes, texture_resolution
from .video import FRAME_PERIOD_US, Mp4Writer

REPO_ID = "nvidia/PhysicalAI-Autonomous-Vehicles"
GENERATOR_VERSION = "flashdrive-synthetic-1"
COC_PATH = "labels/coc/{clip_id}.coc.parquet"
LABEL_STEP_US = 100_000


def repo_cache_dir(cache_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(cache_dir) / ("datasets--" + REPO_ID.replace("/", "--"))


def snapshot_dir(cache_dir: str | pathlib.Path, revision: str) -> pathlib.Path:
    return repo_cache_dir(cache_dir) / "snapshots" / revision


def features_table() -> pd.DataFrame:
    """features.csv rows for the features we write (paths as published, dataset.md §2)."""
    rows = []
    for cam in CAMERA_NAMES:
        rows.append(dict(feature=cam, directory="camera", chunk_path=f"camera/{cam}/{cam}.chunk_{{chunk_id:04d}}.zip",
                         clip_files_in_zip=json.dumps({"video": f"{{clip_id}}.{cam}.mp4",
                                                       "frame_timestamps": f"{{clip_id}}.{cam}.timestamps.parquet"})))
    rows.append(dict(feature="egomotion", directory="labels",
                     chunk_path="labels/egomotion/egomotion.chunk_{chunk_id:04d}.zip",
                     clip_files_in_zip=json.dumps({"egomotion": "{clip_id}.egomotion.parquet"})))
    for name in ("camera_intrinsics", "sensor_extrinsics", "vehicle_dimensions"):
        rows.append(dict(feature=name, directory="calibration",
                         chunk_path=f"calibration/{name}/{name}.chunk_{{chunk_id:04d}}.parquet", clip_files_in_zip=""))
    return pd.DataFrame(rows).set_index("feature")


def egomotion_table(scene: sc.Scene) -> pd.DataFrame:
    """100 Hz egomotion with the real columns. Pose of the rig in the anchor frame (ego at t = 0);
    velocity and acceleration are expressed in the anchor frame too; curvature is the path's (1/m)."""
    t = scene.t_us * 1e-6
    yaw = scene.ego_yaw
    vx, vy = np.gradient(scene.ego_x, t), np.gradient(scene.ego_y, t)
    ax, ay = np.gradient(vx, t), np.gradient(vy, t)
    speed = np.hypot(vx, vy)
    yaw_rate = np.gradient(np.unwrap(yaw), t)
    road_k = scene.road.curvature_at(scene.ego_s)
    curvature = np.where(speed > 0.5, yaw_rate / np.maximum(speed, 0.5), road_k)
    zeros = np.zeros_like(t)
    return pd.DataFrame({
        "timestamp": scene.t_us.astype(np.int64),
        "qx": zeros, "qy": zeros, "qz": np.sin(yaw / 2), "qw": np.cos(yaw / 2),
        "x": scene.ego_x, "y": scene.ego_y, "z": zeros,
        "vx": vx, "vy": vy, "vz": zeros, "ax": ax, "ay": ay, "az": zeros,
        "curvature": curvature,
    })


def frame_timestamps(duration_us: int, offset_us: int) -> np.ndarray:
    """30 fps frame times from offset_us up to the clip end (integer µs, strictly increasing)."""
    n = int(np.floor((duration_us - offset_us) / FRAME_PERIOD_US)) + 1
    return (offset_us + np.round(np.arange(n) * FRAME_PERIOD_US)).astype(np.int64)


def dataset_revision(n_clips: int, seconds: float, width: int, height: int, seed: int) -> str:
    """Deterministic 40-hex 'commit' for a generation request."""
    key = json.dumps(dict(v=GENERATOR_VERSION, n=n_clips, s=seconds, w=width, h=height, seed=seed), sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()


@dataclasses.dataclass
class ClipPlan:
    clip_id: str
    scenario: str
    seed: int
    chunk: int
    camera_offsets_us: dict[str, int]


def plan_clips(n_clips: int, seed: int, chunk_size: int) -> list[ClipPlan]:
    """Clip ids, scenario types (cycled so every type appears), per-clip seeds and camera offsets."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sc.SCENARIO_TYPES))
    plans = []
    for i in range(n_clips):
        clip_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        offsets = {cam: int(rng.integers(0, 12_000)) for cam in CAMERA_NAMES}
        plans.append(ClipPlan(clip_id, sc.SCENARIO_TYPES[order[i % len(order)]], int(rng.integers(2**31)),
                              i // chunk_size, offsets))
    return plans


def write_dataset(out_dir, n_clips: int, seconds: float, width: int, height: int, seed: int,
                  chunk_size: int = 100, log=print) -> tuple[pathlib.Path, str]:
    """Generate and write `n_clips` clips; returns (cache_dir, revision) for the devkit/reader."""
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 16 (yuv420p video), got {width}x{height}")
    if seconds < 8.1:
        raise ValueError(f"clips must be longer than 8.1 s to hold one window (1.6 s history + 6.4 s future), got {seconds}")
    cache_dir = pathlib.Path(out_dir)
    revision = dataset_revision(n_clips, seconds, width, height, seed)
    root = snapshot_dir(cache_dir, revision)
    root.mkdir(parents=True, exist_ok=True)
    (repo_cache_dir(cache_dir) / "refs").mkdir(exist_ok=True)
    (repo_cache_dir(cache_dir) / "refs" / "main").write_text(revision)

    features = features_table()
    features.to_csv(root / "features.csv")
    plans = plan_clips(n_clips, seed, chunk_size)
    rig = default_rig(width, height)
    intrinsics, extrinsics, dims, collection = [], [], [], []
    zips: dict[tuple[str, int], zipfile.ZipFile] = {}

    def chunk_zip(feature: str, chunk: int) -> zipfile.ZipFile:
        if (feature, chunk) not in zips:
            path = root / features.at[feature, "chunk_path"].format(chunk_id=chunk)
            path.parent.mkdir(parents=True, exist_ok=True)
            zips[feature, chunk] = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED)
        return zips[feature, chunk]

    def member(feature: str, alias: str, clip_id: str) -> str:
        return json.loads(features.at[feature, "clip_files_in_zip"])[alias].format(clip_id=clip_id)

    try:
        for k, plan in enumerate(plans):
            started = time.perf_counter()
            scene = sc.build_scene(plan.scenario, plan.seed, seconds)
            texture = GroundTexture.build(scene, texture_resolution(width))
            for cam in CAMERA_NAMES:
                renderer = CameraRenderer(rig[cam], texture)
                stamps = frame_timestamps(scene.duration_us, plan.camera_offsets_us[cam])
                video = Mp4Writer(width, height)
                for t_us in stamps:
                    video.add(renderer.render(scene, int(t_us), scene_boxes(scene, int(t_us))))
                zf = chunk_zip(cam, plan.chunk)
                _add_member(zf, member(cam, "video", plan.clip_id), video.finish())
                _add_member(zf, member(cam, "frame_timestamps", plan.clip_id),
                            _parquet_bytes(pd.DataFrame({"timestamp": stamps})))
                intrinsics.append(dict(clip_id=plan.clip_id, camera_name=cam, **rig[cam].intrinsics.to_row()))
                q, p = rig[cam].quaternion, rig[cam].translation
                extrinsics.append(dict(clip_id=plan.clip_id, sensor_name=cam, qx=q[0], qy=q[1], qz=q[2], qw=q[3],
                                       x=np.float32(p[0]), y=np.float32(p[1]), z=np.float32(p[2])))
            _add_member(chunk_zip("egomotion", plan.chunk), member("egomotion", "egomotion", plan.clip_id),
                        _parquet_bytes(egomotion_table(scene)))
            dims.append(dict(clip_id=plan.clip_id, **sc.EGO_DIMENSIONS))
            collection.append(dict(clip_id=plan.clip_id, country="synthetic", hour_of_day=12,
                                   platform_class="synthetic_hyperion_8.1", scenario=plan.scenario, seed=plan.seed))
            _write_labels(root, plan.clip_id, scene)
            log(f"clip {k + 1}/{n_clips} {plan.clip_id} ({plan.scenario}) {time.perf_counter() - started:.1f} s")
    finally:
        for zf in zips.values():
            zf.close()

    clip_ids = [p.clip_id for p in plans]
    pd.DataFrame({"chunk": [p.chunk for p in plans]}, index=pd.Index(clip_ids, name="clip_id")).to_parquet(
        root / "clip_index.parquet")
    (root / "metadata").mkdir(exist_ok=True)
    pd.DataFrame({f: True for f in features.index}, index=pd.Index(clip_ids, name="clip_id")).to_parquet(
        root / "metadata" / "feature_presence.parquet")
    pd.DataFrame(collection).set_index("clip_id").to_parquet(root / "metadata" / "data_collection.parquet")
    for name, rows, index in (("camera_intrinsics", intrinsics, ["clip_id", "camera_name"]),
                              ("sensor_extrinsics", extrinsics, ["clip_id", "sensor_name"]),
                              ("vehicle_dimensions", dims, ["clip_id"])):
        table = pd.DataFrame(rows)
        for chunk in sorted({p.chunk for p in plans}):
            in_chunk = table["clip_id"].isin([p.clip_id for p in plans if p.chunk == chunk])
            path = root / features.at[name, "chunk_path"].format(chunk_id=chunk)
            path.parent.mkdir(parents=True, exist_ok=True)
            table[in_chunk].set_index(index).to_parquet(path)
    return cache_dir, revision


def _write_labels(root: pathlib.Path, clip_id: str, scene: sc.Scene) -> None:
    """One reasoning sentence per 100 ms t0 over the whole clip."""
    t0s = np.arange(0, scene.duration_us + 1, LABEL_STEP_US, dtype=np.int64)
    rows = clip_labels(scene, t0s)
    path = root / COC_PATH.format(clip_id=clip_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["t0_us", "cause", "action", "coc"]).to_parquet(path, index=False)


def _add_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Store a member with a fixed date, so archives are byte-identical across runs."""
    zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()
