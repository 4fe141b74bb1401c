"""Training curves from train_log.jsonl files (train.py) and finetune_log.jsonl (streaming_finetune.py).

    python -m flashdrive_ros.training.plot_curves --train LOG [LOG ...] [--finetune LOG] --out docs/img/training.png

Several --train logs are stages of one run (e.g. stage 2 continued from stage 1); steps are chained.
"""
from __future__ import annotations

import argparse
import json
import pathlib


def read(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--finetune")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs, offset = [], 0
    for path in args.train:
        stage = read(path)
        recs += [dict(r, step=r["step"] + offset) for r in stage]
        offset += stage[-1]["step"]
    n = 3 if args.finetune else 2
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6))
    steps = [r["step"] for r in recs]
    ax = axes[0]
    ax.semilogy(steps, [r["ce"] for r in recs], lw=0.8, label="train CE (reasoning)")
    ax.semilogy(steps, [r["flow"] for r in recs], lw=0.8, label="train flow MSE")
    ev = [r for r in recs if "eval" in r]
    ax.semilogy([r["step"] for r in ev], [r["eval"]["ce"] for r in ev], "o-", label="held-out CE")
    ax.set_xlabel("step (batch 32)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot([r["step"] for r in ev], [r["eval"]["ade"] for r in ev], "o-", label="model ADE@6.4s (teacher-forced CoC)")
    ax.plot([r["step"] for r in ev], [r["eval"]["ade_cv"] for r in ev], "--", label="constant velocity")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in ev], [r["eval"]["reasoning_exact"] for r in ev], "s:", color="tab:green",
             label="CoC exact")
    ax2.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("m")
    ax.set_title("held-out windows", fontsize=9)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7)
    ax.grid(alpha=0.3)
    if args.finetune:
        ft = read(args.finetune)
        ax = axes[2]
        tr = [r for r in ft if "flow" in r]
        ax.plot([r["step"] for r in tr], [r["flow"] for r in tr], lw=0.8, label="flow MSE (last window)")
        fe = [r for r in ft if "eval" in r]
        ax.plot([r["step"] for r in fe], [r["eval"]["ade"] for r in fe], "o-", label="held-out streaming ADE (m)")
        ax.set_xlabel("fine-tuning step (8 rollouts)")
        ax.set_title("streaming fine-tuning", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
