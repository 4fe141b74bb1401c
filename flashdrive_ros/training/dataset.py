"""Training samples from PhysicalAI-AV format clips, cached once so that epochs never decode video.

    python -m flashdrive_ros.training.dataset --data DIR [--data DIR2 ...] --out samples.pt [--stride-ms 100]

One sample = one window (dataset.md §8, via data.WindowReader): 4 cameras x 4 frames, 16 history
poses, 64 future poses, one chain-of-causation sentence. The cache holds, per window:

  frame_index [4, 4]  rows of `frames`, the camera frames already smart-resized to the model's
                      input size (uint8 levels, exactly what preprocess.py resizes to). Windows 0.1 s
                      apart share 3 of 4 frames, so frames are stored once per (clip, camera, time).
                      preprocess_images() of a resized frame skips the resize, so the pixel patches
                      computed from the cache equal the engine's patches of the original frame.
  prompt_ids [L]      the 1.5 driving prompt with this window's 48 ego-history tokens scattered in
  target_ids [T]      label tokens + <|cot_end|> + <|traj_future_start|> (what follows <|cot_start|>)
  action [64, 2]      ground-truth normalized (accel, curvature) from the future poses (traj -> action)
  history / future poses (ego frame at t0) for metrics and the streaming fine-tuning.

Windows keep their clip and t0 so that consecutive windows of a clip can be rolled out in order.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from flashdrive_ros.engine.action_space import UnicycleActionSpace
from flashdrive_ros.engine.config import AlpamayoConfig
from flashdrive_ros.engine.engine import CAMERA_INDICES, N_FRAMES
from flashdrive_ros.engine.history import encode_history, history_kwargs
from flashdrive_ros.engine.preprocess import preprocess_images, smart_resize
from flashdrive_ros.engine.prompt import _backend, build_prompt
from flashdrive_ros.engine.tokens import TokenIds

CACHE_VERSION = 1
MIN_T0_US = 1_700_000  # FlashDrive / Alpamayo windows start at t0 = 1.7 s


def find_revision(cache_dir: str | pathlib.Path) -> str:
    """The revision of a generated dataset: refs/main of its (only) HF dataset repo in the cache."""
    refs = sorted(pathlib.Path(cache_dir).glob("datasets--*/refs/main"))
    if not refs:
        raise FileNotFoundError(f"no datasets--*/refs/main under {cache_dir} (not a generated dataset cache?)")
    return refs[0].read_text().strip()


def resize_frames(frames: np.ndarray, min_pixels: int, max_pixels: int, factor: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, h, w, 3] at the smart-resize size, with the same bicubic+AA
    kernel as preprocess.py (its uint8 output levels are what the patches are made of)."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    n, height, width, _ = x.shape
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    if (h, w) == (height, width):
        return x.clone()
    chw = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(chw, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return out.permute(0, 2, 3, 1).contiguous()


class TokenizedText:
    """Label sentence -> target ids, encoded like prompt.py encodes its text runs."""

    def __init__(self, tokenizer, ids: TokenIds):
        self.backend = _backend(tokenizer)
        self.ids = ids

    def target(self, label: str) -> list[int]:
        text = self.backend.encode(label, add_special_tokens=False).ids
        return list(text) + [self.ids.cot_end, self.ids.traj_future_start]


@dataclasses.dataclass
class SampleSet:
    """All cached windows. Tensors on CPU; `frames` uint8 [N_frames, h, w, 3]."""

    frames: torch.Tensor
    frame_index: torch.Tensor      # long [S, 4 cams, 4 frames]
    prompt_ids: torch.Tensor       # long [S, L]
    target_ids: list[list[int]]    # per sample: label ids + cot_end + traj_future_start
    action: torch.Tensor           # float32 [S, 64, 2] normalized
    hist_xyz: torch.Tensor         # float64 [S, 16, 3]
    hist_rot: torch.Tensor         # float64 [S, 16, 3, 3]
    fut_xyz: torch.Tensor          # float64 [S, 64, 3]
    fut_rot: torch.Tensor          # float64 [S, 64, 3, 3]
    clip: torch.Tensor             # long [S] index into clip_ids
    t0_us: torch.Tensor            # long [S]
    labels: list[str]
    clip_ids: list[str]
    meta: dict

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    def images(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        """uint8 [B, 16, h, w, 3] camera-major, time-minor (the prompt's image order)."""
        idx = self.frame_index[torch.as_tensor(index, dtype=torch.long)]
        return self.frames[idx.reshape(-1)].reshape(len(idx), idx.shape[1] * idx.shape[2], *self.frames.shape[1:])

    def pixels(self, index, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [B*16*patches, 1536], grid_thw [B*16, 3]) of the given samples."""
        imgs = self.images(index)
        return preprocess_images(imgs.reshape(-1, *imgs.shape[2:]), self.meta["min_pixels"], self.meta["max_pixels"],
                                 self.meta["patch_size"], self.meta["temporal_patch_size"], self.meta["merge_size"],
                                 device=device, dtype=dtype)

    def window_frames(self, i: int) -> np.ndarray:
        """uint8 [4, 4, h, w, 3] numpy, the DriveEngine.step frames argument (already resized)."""
        idx = self.frame_index[i]
        return self.frames[idx.reshape(-1)].reshape(*idx.shape, *self.frames.shape[1:]).cpu().numpy()

    def runs(self, min_len: int) -> list[list[int]]:
        """Sample indices of maximal runs of consecutive windows (same clip, t0 0.1 s apart), >= min_len."""
        order = sorted(range(len(self)), key=lambda i: (int(self.clip[i]), int(self.t0_us[i])))
        runs, cur = [], []
        for i in order:
            if cur and (int(self.clip[i]) != int(self.clip[cur[-1]])
                        or int(self.t0_us[i]) - int(self.t0_us[cur[-1]]) != 100_000):
                if len(cur) >= min_len:
                    runs.append(cur)
                cur = []
            cur.append(i)
        if len(cur) >= min_len:
            runs.append(cur)
        return runs

    @classmethod
    def concat(cls, parts: list["SampleSet"]) -> "SampleSet":
        """One set from several (e.g. caches built in parallel); frame rows and clip numbers are offset."""
        if len({(p.prompt_len, tuple(p.frames.shape[1:])) for p in parts}) != 1:
            raise ValueError("sample sets differ in prompt length or frame size")
        frame_off = np.cumsum([0] + [len(p.frames) for p in parts[:-1]])
        clip_off = np.cumsum([0] + [len(p.clip_ids) for p in parts[:-1]])
        meta = dict(parts[0].meta, sources=[s for p in parts for s in p.meta["sources"]])
        return cls(
            frames=torch.cat([p.frames for p in parts]),
            frame_index=torch.cat([p.frame_index + int(o) for p, o in zip(parts, frame_off)]),
            clip=torch.cat([p.clip + int(o) for p, o in zip(parts, clip_off)]),
            target_ids=[t for p in parts for t in p.target_ids], labels=[t for p in parts for t in p.labels],
            clip_ids=[c for p in parts for c in p.clip_ids], meta=meta,
            **{k: torch.cat([getattr(p, k) for p in parts])
               for k in ("prompt_ids", "action", "hist_xyz", "hist_rot", "fut_xyz", "fut_rot", "t0_us")})

    def save(self, path: str | pathlib.Path) -> None:
        torch.save({"version": CACHE_VERSION, **dataclasses.asdict(self)}, str(path))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "SampleSet":
        data = torch.load(str(path), weights_only=False)
        if data.pop("version", None) != CACHE_VERSION:
            raise ValueError(f"{path}: sample cache version mismatch; rebuild it with flashdrive_ros.training.dataset")
        return cls(**data)


def build_samples(sources, cfg: AlpamayoConfig, tokenizer, stride_us: int = 100_000, max_clips: int | None = None,
                  max_windows_per_clip: int | None = None, log=print) -> SampleSet:
    """Read every window (t0 on the 0.1 s grid from 1.7 s, every `stride_us`) of every clip of the
    given (cache_dir, revision) sources and tokenize / resize / convert it."""
    from flashdrive_ros.data import WindowReader

    ids = TokenIds.from_tokenizer(tokenizer, cfg.traj_token_start_idx, cfg.traj_vocab_size, cfg.future_traj_bins,
                                  cfg.hist_tokenizer.num_bins, cfg.traj_token_ids or None)
    text = TokenizedText(tokenizer, ids)
    action_space = UnicycleActionSpace(cfg.action_space)
    hist_kw = history_kwargs(cfg.hist_tokenizer)
    vis = cfg.vision
    factor = vis.patch_size * vis.spatial_merge_size

    frames: list[torch.Tensor] = []
    frame_rows: dict[tuple, int] = {}
    rows = {k: [] for k in ("frame_index", "prompt_ids", "action", "hist_xyz", "hist_rot", "fut_xyz", "fut_rot",
                            "clip", "t0_us")}
    targets, labels, clip_ids = [], [], []
    template = None
    started = time.perf_counter()
    for cache_dir, revision in sources:
        reader = WindowReader(cache_dir, revision)
        for clip_id in reader.clip_ids():
            if max_clips is not None and len(clip_ids) >= max_clips:
                break
            clip_no = len(clip_ids)
            clip_ids.append(clip_id)
            grid = reader.t0_grid(clip_id, 100_000, MIN_T0_US)
            grid = grid[(grid - grid[0]) % stride_us == 0]
            if max_windows_per_clip is not None:
                grid = grid[:max_windows_per_clip]
            for t0 in grid:
                w = reader.read_window(clip_id, int(t0))
                if w.label is None:
                    continue
                n_cams, n_fr = w.frames.shape[:2]
                new = [(c, f) for c in range(n_cams) for f in range(n_fr)
                       if (clip_no, c, int(w.frame_timestamps_us[c, f])) not in frame_rows]
                if new:
                    resized = resize_frames(np.stack([w.frames[c, f] for c, f in new]), cfg.min_pixels,
                                            cfg.max_pixels, factor)
                    for (c, f), img in zip(new, resized):
                        frame_rows[(clip_no, c, int(w.frame_timestamps_us[c, f]))] = len(frames)
                        frames.append(img)
                index = [[frame_rows[(clip_no, c, int(w.frame_timestamps_us[c, f]))] for f in range(n_fr)]
                         for c in range(n_cams)]
                if template is None:
                    h, wd = frames[0].shape[:2]
                    n_tok = (h // vis.patch_size) * (wd // vis.patch_size) // vis.spatial_merge_size ** 2
                    template = build_prompt(tokenizer, ids, CAMERA_INDICES, N_FRAMES, n_tok,
                                            include_camera_ids=cfg.include_camera_ids,
                                            include_frame_nums=cfg.include_frame_nums)
                prompt, layout = template
                hist_xyz = torch.from_numpy(np.asarray(w.ego_history_xyz, dtype=np.float64))
                hist_rot = torch.from_numpy(np.asarray(w.ego_history_rot, dtype=np.float64))
                fut_xyz = torch.from_numpy(np.asarray(w.ego_future_xyz, dtype=np.float64))
                fut_rot = torch.from_numpy(np.asarray(w.ego_future_rot, dtype=np.float64))
                p = prompt.clone()
                p[layout.history_positions] = encode_history(hist_xyz.float(), ids.history_start, **hist_kw).to(p.dtype)
                rows["frame_index"].append(torch.tensor(index))
                rows["prompt_ids"].append(p)
                rows["action"].append(action_space.trajectory_to_action(fut_xyz, fut_rot, hist_xyz, hist_rot).float())
                rows["hist_xyz"].append(hist_xyz)
                rows["hist_rot"].append(hist_rot)
                rows["fut_xyz"].append(fut_xyz)
                rows["fut_rot"].append(fut_rot)
                rows["clip"].append(torch.tensor(clip_no))
                rows["t0_us"].append(torch.tensor(int(t0)))
                targets.append(text.target(w.label))
                labels.append(w.label)
            log(f"clip {clip_no + 1} {clip_id}: {len(labels)} samples, {len(frames)} frames, "
                f"{time.perf_counter() - started:.0f} s")
    if not labels:
        raise ValueError("no labelled windows found in the given datasets")
    meta = dict(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=vis.patch_size,
                temporal_patch_size=vis.temporal_patch_size, merge_size=vis.spatial_merge_size,
                stride_us=int(stride_us), sources=[(str(c), r) for c, r in sources],
                n_image_tokens=template[1].n_image_tokens, vocab_size=cfg.vocab_size)
    return SampleSet(frames=torch.stack(frames), target_ids=targets, labels=labels, clip_ids=clip_ids, meta=meta,
                     **{k: torch.stack(v) for k, v in rows.items()})


def load_cfg_and_tokenizer(model: str = "tiny"):
    """Config + tokenizer of a checkpoint dir ('tiny' = the shipped assets; weights not needed)."""
    from flashdrive_ros.engine.config import tiny_config
    from flashdrive_ros.engine.loader import TINY_DIR, load_config
    from flashdrive_ros.engine.tokens import load_tokenizer

    directory = TINY_DIR if model == "tiny" else pathlib.Path(model)
    cfg = load_config(directory) if (directory / "config.json").is_file() else tiny_config()
    return cfg, load_tokenizer(directory, cfg.traj_token_start_idx, cfg.traj_vocab_size)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", default=[],
                    help="generated dataset cache dir (repeatable); DIR@REVISION to pick a revision")
    ap.add_argument("--merge", nargs="+", metavar="PT", help="instead: concatenate these sample caches")
    ap.add_argument("--out", required=True, help="output .pt file")
    ap.add_argument("--model", default="tiny", help="checkpoint dir whose config/tokenizer to use")
    ap.add_argument("--stride-ms", type=int, default=100)
    ap.add_argument("--max-clips", type=int)
    ap.add_argument("--max-windows", type=int, help="per clip")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.merge:
        samples = SampleSet.concat([SampleSet.load(p) for p in args.merge])
        samples.save(args.out)
        print(f"wrote {args.out}: {len(samples)} samples from {len(args.merge)} caches", file=sys.stderr)
        return
    if not args.data:
        raise SystemExit("give --data DIR (or --merge PT ...)")
    sources = []
    for spec in args.data:
        path, _, rev = spec.partition("@")
        sources.append((path, rev or find_revision(path)))
    cfg, tok = load_cfg_and_tokenizer(args.model)
    samples = build_samples(sources, cfg, tok, args.stride_ms * 1000, args.max_clips, args.max_windows)
    samples.save(args.out)
    print(f"wrote {args.out}: {len(samples)} samples, {len(samples.frames)} frames "
          f"{tuple(samples.frames.shape[1:])}, prompt length {samples.prompt_len}", file=sys.stderr)


if __name__ == "__main__":
    main()
