"""Convert one PhysicalAI-AV clip into a rosbag2 bag (MCAP by default) for replay.

    clip_to_bag --dataset <hf cache dir> --clip <clip id> --out <bag dir> [--revision <commit>]
                [--start-s S] [--duration-s D] [--odom-hz 50] [--jpeg-quality 90] [--epoch-s 1.7e9]

The clip is read offline through the official `physical_ai_av` devkit, opened by the data package's
`open_dataset`; the ground truth comes from its `WindowReader.trajectory`, so it is exactly the future the
offline evaluation scores against. The bag holds (docs/DESIGN.md,
"ROS interfaces"): every frame of the four Alpamayo cameras as JPEG CompressedImage (~30 fps, true frame
timestamps) with a CameraInfo per frame, nav_msgs/Odometry from egomotion at `--odom-hz`, one /tf_static
with the camera extrinsics, and the ground-truth 6.4 s future as nav_msgs/Path at every anchor-camera
frame whose future lies inside the egomotion range. Bag log time == header stamp == epoch + clip time.
Written with `rosbags`, so no ROS installation is needed; `ros2 bag play` plays it on a ROS host.
"""
from __future__ import annotations

import argparse
import heapq
import io
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import numpy as np

from flashdrive_ros.nodes import bag_topics as bt

HF_REPO_ID = "nvidia/PhysicalAI-Autonomous-Vehicles"
GT_ANCHOR_CAMERA = "camera_front_wide_120fov"   # the drive node's default anchor camera (t0 source)
DECODE_CHUNK = 16                                # frames decoded per devkit call (memory ~ chunk * frame)


# ---- reading the clip through the devkit ------------------------------------------------------------

@dataclass
class ClipData:
    """What the converter needs from one clip, as devkit objects."""
    clip_id: str
    videos: dict                 # camera name -> physical_ai_av.video.SeekVideoReader (has .timestamps)
    egomotion: object            # physical_ai_av interpolator: f(us array) -> EgomotionState; .time_range
    intrinsics: object | None    # physical_ai_av.calibration.CameraIntrinsics
    extrinsics: object | None    # physical_ai_av.calibration.SensorExtrinsics
    future: object               # t0_us -> (xyz [64,3], rot [64,3,3]) in the ego frame at t0
    source: dict = field(default_factory=dict)   # provenance for the bag metadata

    def close(self):
        for v in self.videos.values():
            v.close()


def _resolve_revision(cache_dir: Path, revision: str | None) -> str:
    if revision:
        return revision
    snaps = cache_dir / ("datasets--" + HF_REPO_ID.replace("/", "--")) / "snapshots"
    found = sorted(p.name for p in snaps.glob("*") if p.is_dir()) if snaps.is_dir() else []
    if len(found) != 1:
        raise SystemExit(f"clip_to_bag: pass --revision: expected exactly one snapshot under {snaps}, "
                         f"found {found or 'none'}")
    return found[0]


def open_devkit(cache_dir: str | Path, revision: str | None = None):
    """PhysicalAIAVDatasetInterface reading only the local Hugging Face cache (dataset.md §7)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise SystemExit(f"clip_to_bag: dataset cache dir {cache_dir} does not exist")
    revision = _resolve_revision(cache_dir, revision)
    from flashdrive_ros.data import DatasetFileError, open_dataset
    try:
        return open_dataset(cache_dir, revision), revision
    except (DatasetFileError, ValueError) as exc:
        raise SystemExit(f"clip_to_bag: cannot open the dataset at {cache_dir}: {exc}")


def read_clip(devkit, clip_id: str, cameras=bt.CAMERA_NAMES) -> ClipData:
    from flashdrive_ros.data import WindowReader
    if clip_id not in devkit.clip_index.index:
        raise SystemExit(f"clip_to_bag: clip {clip_id} is not in the dataset index (clip_index.parquet)")
    windows = WindowReader(devkit, cameras=())     # ground truth only: no second copy of the videos
    try:
        videos = {name: devkit.get_clip_feature(clip_id, name) for name in cameras}
        ego = devkit.get_clip_feature(clip_id, "egomotion")
    except FileNotFoundError as exc:
        raise SystemExit(f"clip_to_bag: clip {clip_id}: a required file is not in the local cache: {exc}")
    except KeyError as exc:
        raise SystemExit(f"clip_to_bag: clip {clip_id} is not in the dataset index ({exc})")
    intr = extr = None
    try:
        intr = devkit.get_clip_feature(clip_id, "camera_intrinsics")
        extr = devkit.get_clip_feature(clip_id, "sensor_extrinsics")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"clip_to_bag: warning: no calibration for {clip_id} ({exc}); camera_info/tf_static omitted",
              file=sys.stderr)
    for name, v in videos.items():
        if v.timestamps is None or len(v.timestamps) == 0:
            raise SystemExit(f"clip_to_bag: {clip_id}/{name} has no frame timestamps")
    return ClipData(clip_id, videos, ego, intr, extr, future=lambda t0: windows.trajectory(clip_id, int(t0))[2:])


# ---- conversion ----------------------------------------------------------------------------------------

def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _camera_stream(clip: ClipData, fac: bt.MessageFactory, name: str, t_lo: int, t_hi: int, quality: int,
                   epoch_ns: int, order: int) -> Iterator[tuple]:
    reader = clip.videos[name]
    ts = np.asarray(reader.timestamps, dtype=np.int64)
    idx = np.nonzero((ts >= t_lo) & (ts <= t_hi))[0]
    model = clip.intrinsics.camera_models.get(name) if clip.intrinsics is not None else None
    for start in range(0, len(idx), DECODE_CHUNK):
        chunk = idx[start:start + DECODE_CHUNK]
        frames = reader.decode_images_from_frame_indices(chunk)
        for i, rgb in zip(chunk, frames):
            ns = bt.clip_us_to_ns(ts[i], epoch_ns)
            yield ns, order, bt.camera_topic(name), fac.compressed_image(ns, name, encode_jpeg(rgb, quality))
            if model is not None:
                info = fac.camera_info(ns, name, model.width, model.height, float(model.principal_point[0]),
                                       float(model.principal_point[1]), model.th2r.coef)
                yield ns, order, bt.camera_info_topic(name), info


def _poses(ego, t_us: np.ndarray):
    st = ego(np.asarray(t_us, dtype=np.int64))
    return np.asarray(st.pose.translation, dtype=np.float64), st.pose.rotation


def odometry_samples(ego, t_us: np.ndarray, h_us: int = 5_000):
    """Pose, body-frame linear and angular velocity at t_us. Velocities by central differences of the
    interpolated pose, so they are in base_link whatever frame the dataset's vx/vy/vz use."""
    lo, hi = ego.time_range
    t_us = np.asarray(t_us, dtype=np.int64)
    ta, tb = np.maximum(t_us - h_us, lo), np.minimum(t_us + h_us, hi)
    dt = (tb - ta).astype(np.float64) * 1e-6
    xyz, rot = _poses(ego, t_us)
    xa, ra = _poses(ego, ta)
    xb, rb = _poses(ego, tb)
    v_world = (xb - xa) / dt[:, None]
    v_base = rot.inv().apply(v_world)
    w_base = (ra.inv() * rb).as_rotvec() / dt[:, None]
    return xyz, rot.as_quat(), v_base, w_base


def _odom_stream(clip, fac, t_lo, t_hi, hz, epoch_ns, order, batch=500):
    period = int(round(1e6 / hz))
    first = -(-t_lo // period) * period
    times = np.arange(first, t_hi + 1, period, dtype=np.int64)
    for s in range(0, len(times), batch):
        t = times[s:s + batch]
        xyz, quat, v, w = odometry_samples(clip.egomotion, t)
        for i in range(len(t)):
            ns = bt.clip_us_to_ns(t[i], epoch_ns)
            yield ns, order, bt.ODOM_TOPIC, fac.odometry(ns, xyz[i], quat[i], v[i], w[i])


def _gt_stream(clip, fac, t_lo, t_hi, epoch_ns, order):
    ego_lo, ego_hi = clip.egomotion.time_range
    anchor = GT_ANCHOR_CAMERA if GT_ANCHOR_CAMERA in clip.videos else next(iter(clip.videos))
    ts = np.asarray(clip.videos[anchor].timestamps, dtype=np.int64)
    # t0s the window reader accepts: 1.5 s of history and the 6.4 s future inside the egomotion range.
    t0s = ts[(ts >= t_lo) & (ts <= t_hi) & (ts - bt.GT_HISTORY_US >= ego_lo)
             & (ts + bt.GT_STEPS * bt.GT_DT_US <= ego_hi)]
    from scipy.spatial.transform import Rotation
    for t0 in t0s:
        xyz, rot = clip.future(int(t0))
        ns = bt.clip_us_to_ns(t0, epoch_ns)
        yield ns, order, bt.GROUND_TRUTH_TOPIC, fac.future_path(ns, xyz, Rotation.from_matrix(rot).as_quat())


def _tf_static(clip, fac, ns):
    transforms = {}
    for name in clip.videos:
        pose = clip.extrinsics.sensor_poses.get(name)
        if pose is not None:
            transforms[name] = (np.asarray(pose.translation, dtype=np.float64), pose.rotation.as_quat())
    return fac.tf_static(ns, transforms)


@dataclass
class ConvertOptions:
    start_s: float = 0.0
    duration_s: float | None = None
    odom_hz: float = 50.0
    jpeg_quality: int = 90
    epoch_ns: int = bt.DEFAULT_EPOCH_NS
    storage: str = "mcap"
    bag_version: int = 9
    progress: bool = True


def convert(clip: ClipData, out: str | Path, opts: ConvertOptions = ConvertOptions()) -> dict:
    """Write the bag; returns {topic: message count}."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    out = Path(out)
    if out.exists():
        raise SystemExit(f"clip_to_bag: output {out} already exists (rosbag2 writers need a new directory)")
    if not 1 <= opts.jpeg_quality <= 100:
        raise SystemExit(f"clip_to_bag: --jpeg-quality must be in 1..100, got {opts.jpeg_quality}")
    if opts.odom_hz <= 0:
        raise SystemExit(f"clip_to_bag: --odom-hz must be > 0, got {opts.odom_hz}")
    storage = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}.get(opts.storage)
    if storage is None:
        raise SystemExit(f"clip_to_bag: --storage must be mcap or sqlite3, got {opts.storage!r}")

    ego_lo, ego_hi = (int(x) for x in clip.egomotion.time_range)
    cam_lo = max(int(v.timestamps[0]) for v in clip.videos.values())
    t_lo = max(0, int(round(opts.start_s * 1e6)))
    t_hi = max(max(int(v.timestamps[-1]) for v in clip.videos.values()), ego_hi)
    if opts.duration_s is not None:
        t_hi = min(t_hi, t_lo + int(round(opts.duration_s * 1e6)))
    if t_hi <= t_lo:
        raise SystemExit(f"clip_to_bag: empty time window [{t_lo}, {t_hi}] us for clip {clip.clip_id}")

    ts = get_typestore(Stores.ROS2_KILTED)
    fac = bt.MessageFactory(ts)
    streams = [_camera_stream(clip, fac, name, t_lo, t_hi, opts.jpeg_quality, opts.epoch_ns, order)
               for order, name in enumerate(clip.videos)]
    streams.append(_odom_stream(clip, fac, max(t_lo, ego_lo), min(t_hi, ego_hi), opts.odom_hz, opts.epoch_ns, 10))
    streams.append(_gt_stream(clip, fac, t_lo, t_hi, opts.epoch_ns, 11))
    n_frames = sum(int(np.count_nonzero((v.timestamps >= t_lo) & (v.timestamps <= t_hi)))
                   for v in clip.videos.values())

    def qos(topic):
        q = bt.qos_for(topic)
        return [Qos(history=QosHistory.KEEP_LAST, depth=q.depth, reliability=QosReliability.RELIABLE,
                    durability=QosDurability.TRANSIENT_LOCAL if q.transient_local else QosDurability.VOLATILE,
                    deadline=QosTime(0, 0), lifespan=QosTime(0, 0), liveliness=QosLiveliness.AUTOMATIC,
                    liveliness_lease_duration=QosTime(0, 0), avoid_ros_namespace_conventions=False)]

    counts: dict = {}
    writer = Writer(out, version=opts.bag_version, storage_plugin=storage)
    writer.set_custom_data(bt.META_CLIP_ID, clip.clip_id)
    writer.set_custom_data(bt.META_EPOCH_NS, str(opts.epoch_ns))
    writer.set_custom_data(bt.META_FORMAT, bt.FORMAT_VERSION)
    for k, v in clip.source.items():
        writer.set_custom_data(f"flashdrive.source.{k}", str(v))
    bar = None
    if opts.progress:
        from tqdm import tqdm
        bar = tqdm(total=n_frames, unit="frame", desc=f"clip {clip.clip_id}", file=sys.stderr)
    with writer:
        conns = {}
        for topic, msgtype in bt.bag_topic_types().items():
            conns[topic] = writer.add_connection(topic, msgtype, typestore=ts, offered_qos_profiles=qos(topic))
        if clip.extrinsics is not None:
            first_ns = bt.clip_us_to_ns(max(t_lo, min(cam_lo, ego_lo)), opts.epoch_ns)
            writer.write(conns[bt.TF_STATIC_TOPIC], first_ns, fac.serialize(_tf_static(clip, fac, first_ns)))
            counts[bt.TF_STATIC_TOPIC] = 1
        # Merge the per-stream generators by stamp so the bag is written in log-time order.
        for ns, _, topic, msg in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
            writer.write(conns[topic], ns, fac.serialize(msg))
            counts[topic] = counts.get(topic, 0) + 1
            if bar is not None and msg.__msgtype__ == bt.COMPRESSED_IMAGE:
                bar.update(1)
    if bar is not None:
        bar.close()
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip_to_bag", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="Hugging Face hub cache dir holding the dataset snapshot")
    p.add_argument("--revision", default=None, help="dataset commit (default: the only cached snapshot)")
    p.add_argument("--clip", required=True, help="clip id")
    p.add_argument("--out", required=True, help="output bag directory (must not exist)")
    p.add_argument("--start-s", type=float, default=0.0, help="first clip time to convert (s)")
    p.add_argument("--duration-s", type=float, default=None, help="seconds to convert (default: all)")
    p.add_argument("--odom-hz", type=float, default=50.0, help="odometry rate (egomotion is ~100 Hz)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--epoch-s", type=Decimal, default=Decimal(bt.DEFAULT_EPOCH_NS) / 10**9,
                   help="ROS time of clip time 0 (s); stored in the bag metadata")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--bag-version", type=int, choices=(8, 9), default=9,
                   help="rosbag2 metadata version (9 = Jazzy/Kilted)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    devkit, revision = open_devkit(args.dataset, args.revision)
    clip = read_clip(devkit, args.clip)
    clip.source.update(revision=revision)
    opts = ConvertOptions(start_s=args.start_s, duration_s=args.duration_s, odom_hz=args.odom_hz,
                          jpeg_quality=args.jpeg_quality, epoch_ns=int(args.epoch_s * 10**9),
                          storage=args.storage, bag_version=args.bag_version, progress=not args.no_progress)
    try:
        counts = convert(clip, args.out, opts)
    finally:
        clip.close()
    for topic, n in sorted(counts.items()):
        print(f"{n:7d}  {topic}")
    print(f"clip_to_bag: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
