"""Plot a few held-out windows: front camera frame with the model's reasoning (and the label), and
the bird's-eye trajectory (K samples) against the ground truth and a constant-velocity extrapolation.

    python -m flashdrive_ros.training.plot_windows --data DIR --model tiny --out docs/img/heldout_windows.png
"""
from __future__ import annotations

import argparse
import pathlib
import textwrap

import numpy as np
import torch

from flashdrive_ros.data import CAMERA_NAMES, WindowReader
from flashdrive_ros.engine import DriveEngine
from flashdrive_ros.evaluation.metrics import constant_velocity_prediction

from .dataset import find_revision


def pick_windows(reader: WindowReader, n: int, t0_s: float) -> list[tuple[str, int]]:
    """One window per clip (the first n clips) at t0_s seconds, on the 0.1 s grid inside the valid range."""
    out = []
    for clip_id in reader.clip_ids()[:n]:
        grid = reader.t0_grid(clip_id)
        t0 = int(grid[np.argmin(np.abs(grid - t0_s * 1e6))])
        out.append((clip_id, t0))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset dir (DIR[@REVISION])")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", required=True, help="output .png")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--t0", type=float, default=6.0, help="t0 in seconds of the plotted window of each clip")
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, _, rev = args.data.partition("@")
    reader = WindowReader(path, rev or find_revision(path))
    engine = DriveEngine.from_pretrained(args.model, device=args.device, streaming=False,
                                         num_samples=args.samples, seed=args.seed)
    front = CAMERA_NAMES.index("camera_front_wide_120fov")
    windows = pick_windows(reader, args.windows, args.t0)
    fig, axes = plt.subplots(len(windows), 2, figsize=(11, 3.6 * len(windows)),
                             gridspec_kw={"width_ratios": [1.7, 1]}, squeeze=False)
    for row, (clip_id, t0) in enumerate(windows):
        w = reader.read_window(clip_id, t0)
        r = engine.step(w.frames, t0, w.ego_history_xyz, w.ego_history_rot)
        ax = axes[row, 0]
        ax.imshow(w.frames[front, -1])
        ax.set_axis_off()
        ok = "=" if r.reasoning.strip() == (w.label or "").strip() else "≠"
        ax.set_title(f"{clip_id[:8]}  t0 = {t0 / 1e6:.1f} s  (front camera)", fontsize=9)
        text = (f"model: {textwrap.fill(r.reasoning, 80)}\n"
                f"label {ok} {textwrap.fill(w.label or '(none)', 80)}")
        ax.text(0.0, -0.04, text, transform=ax.transAxes, va="top", fontsize=8, family="monospace")
        ax = axes[row, 1]
        gt, hist = w.ego_future_xyz, w.ego_history_xyz
        cv = constant_velocity_prediction(hist, len(gt))[0]
        ax.plot(-hist[:, 1], hist[:, 0], color="0.6", lw=2, label="history")
        for k in range(r.xyz.shape[0]):
            ax.plot(-r.xyz[k, :, 1], r.xyz[k, :, 0], color="tab:blue", lw=1.6 if k == 0 else 0.7,
                    alpha=1.0 if k == 0 else 0.35, label="model (K=%d)" % r.xyz.shape[0] if k == 0 else None)
        ax.plot(-cv[:, 1], cv[:, 0], color="tab:orange", ls=":", lw=1.4, label="const. velocity")
        ax.plot(-gt[:, 1], gt[:, 0], color="k", ls="--", lw=1.4, label="ground truth")
        ade = float(np.linalg.norm(r.xyz[0, :, :2] - gt[:, :2], axis=-1).mean())
        ax.set_title(f"bird's-eye (m), ADE {ade:.2f} m", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        if row == 0:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
