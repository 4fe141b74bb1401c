"""The drive node's host path per window at camera resolution: decode, assemble, upload + preprocess.

The GPU benchmark (`python -m flashdrive_ros.bench`) times the model's stages; before them the drive node turns
four new JPEG frames into the engine's input, and at the PhysicalAI-AV cameras' 1920x1080 that host work is
of the same order as the model's step. This times each piece both ways, old and new, on synthetic
camera-like JPEGs (no model needed):

- decode: the 4 new frames of a streaming window (the 12 older ones are cached), one after the other in the
  worker, against a pool of `--threads` threads (what `decode_threads` does in the node); on CUDA with
  torchvision also the nvJPEG decode on the GPU (the node's `jpeg_decoder: nvjpeg`), then the preprocess of
  those frames, which are on the device already;
- assemble: copying the 16 decoded frames into one [4, 4, H, W, 3] array, against handing the engine 4 lists
  of the same arrays (no copy);
- upload + preprocess: the 4 frames a streaming step reads, sliced from that array and sent from pageable
  memory, against the list through the engine's FrameUploader (reused pinned buffer); both then resize,
  normalize and cut into patches on `--device`.

    python -m flashdrive_ros.bench.host [--device cuda] [--height 1080 --width 1920] [--repeats 20]
        [--threads 4] [--json PATH]

Prints a Markdown table of median / p90 wall times (ms) with a device sync after each piece.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from flashdrive_ros.bench.timing import percentile
from flashdrive_ros.engine.preprocess import FrameUploader, preprocess_images
from types import SimpleNamespace

from flashdrive_ros.nodes.image_decode import NvJpegDecoder, decode_compressed

REAL_PIXELS = dict(min_pixels=163840, max_pixels=196608)  # Alpamayo's limits: 1920x1080 -> 576x320


def camera_like_jpeg(height: int, width: int, seed: int, quality: int = 90) -> bytes:
    """A JPEG with smooth structure and sensor-like noise, so its size and decode cost are a camera's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 255, yy / height * 255, 128 + 100 * np.sin((xx + 2 * yy) / 40)], -1)
    img = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _timed(fn, repeats: int, device: torch.device) -> tuple[list[float], object]:
    out = fn()  # warm-up (allocations, pinned buffers, kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - t))
    return times, out


def _nvjpeg_decoder(device: torch.device):
    """The node's jpeg_decoder 'nvjpeg' (torchvision on CUDA), or None where it cannot run."""
    if device.type != "cuda":
        return None
    try:
        return NvJpegDecoder(str(device))
    except RuntimeError:
        return None


def run(height: int, width: int, device: torch.device, repeats: int, threads: int) -> dict:
    jpegs = [camera_like_jpeg(height, width, seed) for seed in range(4)]  # the 4 new frames of a window
    pool = ThreadPoolExecutor(threads)
    rows: dict[str, list[float]] = {}
    rows["decode 4 new frames: serial"], decoded = _timed(lambda: [decode_compressed(j) for j in jpegs],
                                                         repeats, device)
    rows[f"decode 4 new frames: {threads} threads"], pooled = _timed(
        lambda: list(pool.map(decode_compressed, jpegs)), repeats, device)
    pool.shutdown()
    assert all(np.array_equal(a, b) for a, b in zip(decoded, pooled))
    nvjpeg, on_device = _nvjpeg_decoder(device), None
    if nvjpeg is not None:  # the node's jpeg_decoder 'nvjpeg'
        msgs = [SimpleNamespace(format="jpeg", data=j) for j in jpegs]
        rows["decode 4 new frames: nvJPEG on the GPU (jpeg_decoder 'nvjpeg')"], on_device = _timed(
            lambda: nvjpeg.decode_many(msgs), repeats, device)
        nvjpeg_vs_pillow = max(int((t.cpu().int() - torch.from_numpy(np.array(d)).int()).abs().max())
                               for t, d in zip(on_device, decoded))
    # a window: frame k of camera c; the newest frame of each camera is one of the 4 decoded ones
    window = [[decoded[(c + k) % 4] for k in range(4)] for c in range(4)]

    def assemble():
        out = np.zeros((4, 4, height, width, 3), dtype=np.uint8)
        for c in range(4):
            for k in range(4):
                out[c, k] = window[c][k]
        return out

    rows["assemble [4, 4, H, W, 3]"], frames = _timed(assemble, repeats, device)
    rows["hand over 4 lists (no copy)"], _ = _timed(lambda: [list(cam) for cam in window], repeats, device)

    def old_preprocess():  # the newest frame of each camera, sliced from the array, pageable upload
        images = frames[:, 3:].reshape(-1, height, width, 3)
        return preprocess_images(images, **REAL_PIXELS, device=device)

    uploader = FrameUploader(device)

    def new_preprocess():
        return preprocess_images([cam[3] for cam in window], **REAL_PIXELS, device=device, uploader=uploader)

    rows["upload + preprocess: array slice, pageable"], a = _timed(old_preprocess, repeats, device)
    rows["upload + preprocess: list, pinned uploader"], b = _timed(new_preprocess, repeats, device)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].cpu(), b[1].cpu())
    if on_device is not None:
        rows["preprocess: nvJPEG frames (on the device already)"], _ = _timed(
            lambda: preprocess_images(list(on_device), **REAL_PIXELS, device=device, uploader=uploader),
            repeats, device)
    summary = {name: {"median_ms": round(statistics.median(t), 3), "p90_ms": round(percentile(t, 90), 3)}
               for name, t in rows.items()}
    old = sum(summary[k]["median_ms"] for k in ("decode 4 new frames: serial", "assemble [4, 4, H, W, 3]",
                                                 "upload + preprocess: array slice, pageable"))
    new = sum(summary[k]["median_ms"] for k in (f"decode 4 new frames: {threads} threads",
                                                 "hand over 4 lists (no copy)",
                                                 "upload + preprocess: list, pinned uploader"))
    extra = {}
    if on_device is not None:
        extra["total_nvjpeg_ms"] = round(sum(summary[k]["median_ms"] for k in (
            "decode 4 new frames: nvJPEG on the GPU (jpeg_decoder 'nvjpeg')", "hand over 4 lists (no copy)",
            "preprocess: nvJPEG frames (on the device already)")), 3)
        extra["nvjpeg_max_abs_diff_to_pillow_levels"] = nvjpeg_vs_pillow
    return {
        **extra,
        "image": f"{width}x{height}", "jpeg_bytes": [len(j) for j in jpegs], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "threads": threads, "repeats": repeats, "torch": torch.__version__,
        "rows": summary, "total_before_ms": round(old, 3), "total_after_ms": round(new, 3),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_markdown(res: dict) -> str:
    lines = [f"Drive node host path per streaming window, {res['image']} JPEG frames, device {res['device']} "
             f"({res['device_name']}), {res['cpu_count']} CPUs ({res['cpu']}), median / p90 of {res['repeats']} (ms)", "",
             "| piece | median ms | p90 ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['median_ms']:.2f} | {v['p90_ms']:.2f} |" for name, v in res["rows"].items()]
    lines += ["", f"before (serial decode + assemble + pageable upload): {res['total_before_ms']:.2f} ms; "
                  f"after ({res['threads']} decode threads + lists + pinned uploader): {res['total_after_ms']:.2f} ms"]
    if "total_nvjpeg_ms" in res:
        lines += [f"with jpeg_decoder 'nvjpeg' (GPU decode + lists + preprocess on the device): "
                  f"{res['total_nvjpeg_ms']:.2f} ms; nvJPEG pixels differ from Pillow's by at most "
                  f"{res['nvjpeg_max_abs_diff_to_pillow_levels']} levels"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=4, help="decode threads (the node's decode_threads)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.height < 32 or args.width < 32:
        ap.error("--repeats and --threads must be >= 1, --height/--width >= 32")
    res = run(args.height, args.width, torch.device(args.device), args.repeats, args.threads)
    print(to_markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
