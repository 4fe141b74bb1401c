r"""flashdrive-eval: run N named configurations over clips × 10 Hz windows and write a report.

Examples (docs/EVALUATION.md):
  python -m flashdrive_ros.evaluation --synthetic 1 --max-windows 20 --out runs/eval
  python -m flashdrive_ros.evaluation --dataset /data/pai --warmup 4 \
      --config name=baseline,streaming=0 --config name=streaming,streaming=1,flow=adaptive \
      --config name=ft,streaming=1,checkpoint=/ckpt/ft --config constant_velocity --out runs/table1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .report import write_report
from .runner import WINDOW_STRIDE_US, EvalConfig, run_evaluation

DEFAULT_CONFIGS = ("name=baseline,streaming=0", "name=streaming,streaming=1", "constant_velocity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashdrive-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", type=Path, help="PhysicalAI-AV format dataset root (local)")
    data.add_argument("--revision", help="dataset revision (commit hash) when the root holds several")
    data.add_argument("--synthetic", type=int, metavar="N",
                      help="generate N synthetic clips into OUT/dataset and evaluate on them")
    data.add_argument("--synthetic-seconds", type=float, default=10.0, help="length of each synthetic clip")
    data.add_argument("--synthetic-size", default="320x180", help="synthetic camera resolution WxH")
    data.add_argument("--synthetic-seed", type=int, default=0)
    data.add_argument("--clips", help="comma-separated clip ids (default: all)")
    data.add_argument("--max-clips", type=int, help="only the first N clips")

    win = p.add_argument_group("windows")
    win.add_argument("--stride-ms", type=int, default=WINDOW_STRIDE_US // 1000, help="window stride (10 Hz = 100)")
    win.add_argument("--t0-start", type=float, help="first t0 in seconds (default: first valid)")
    win.add_argument("--t0-end", type=float, help="last t0 in seconds (default: last valid)")
    win.add_argument("--max-windows", type=int, help="at most N windows per clip")
    win.add_argument("--warmup", type=int, default=0,
                     help="exclude the first N windows of every clip from the metrics "
                          "(FlashDrive: 4 = the full-prefill window + 3 streaming steps)")

    cfg = p.add_argument_group("configurations")
    cfg.add_argument("--config", action="append", metavar="SPEC",
                     help="repeatable: name=NAME,key=value,... with keys streaming, flow (uniform|adaptive), "
                          "checkpoint, samples, speculative, temperature, top_p, max_new_tokens, seed, "
                          "predictor (engine|constant_velocity), or the bare word constant_velocity. "
                          f"Default: {' | '.join(DEFAULT_CONFIGS)}")
    cfg.add_argument("--model", default="tiny", help="default checkpoint: 'tiny' or a directory")
    cfg.add_argument("--device", default="cpu")
    cfg.add_argument("--dtype", default="float32", help="torch dtype name")
    cfg.add_argument("--num-samples", type=int, default=6, help="K trajectories per window (minADE_K)")
    cfg.add_argument("--temperature", type=float, help="reasoning sampling temperature (default: engine's)")
    cfg.add_argument("--top-p", type=float)
    cfg.add_argument("--max-new-tokens", type=int)
    cfg.add_argument("--seed", type=int, default=0)
    cfg.add_argument("--threads", type=int,
                     help="torch CPU threads (default: torch's); 1 is much faster on a shared, loaded CPU")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("eval_out"), help="output directory")
    out.add_argument("--plot-clips", type=int, default=2, help="clips with bird's-eye plots")
    out.add_argument("--plot-windows", type=int, default=3, help="windows per plotted clip")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--save-trajectories", action="store_true",
                     help="also write trajectories.npz (every prediction and ground truth)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def engine_defaults(args: argparse.Namespace) -> dict:
    """Options every engine configuration starts from (a --config key overrides them)."""
    d = {"model": args.model, "device": args.device, "dtype": args.dtype, "num_samples": args.num_samples,
         "seed": args.seed}
    for key in ("temperature", "top_p", "max_new_tokens"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    return d


def _dataset(args: argparse.Namespace) -> tuple[Path, str | None]:
    if args.dataset is not None and args.synthetic:
        raise SystemExit("give --dataset or --synthetic, not both")
    if args.dataset is not None:
        return args.dataset, args.revision
    if not args.synthetic:
        raise SystemExit("give --dataset ROOT or --synthetic N")
    from flashdrive_ros.data import synthetic_dataset
    width, height = (int(v) for v in args.synthetic_size.lower().split("x"))
    print(f"generating {args.synthetic} synthetic clip(s) in {args.out / 'dataset'} ...", file=sys.stderr)
    made = synthetic_dataset(args.out / "dataset", n_clips=args.synthetic, seconds=args.synthetic_seconds,
                             width=width, height=height, seed=args.synthetic_seed)
    if isinstance(made, tuple):
        return Path(made[0]), made[1]
    return Path(made), None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = engine_defaults(args)
    configs = [EvalConfig.parse(text, defaults) for text in (args.config or DEFAULT_CONFIGS)]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    root, revision = _dataset(args)

    from .source import DatasetSource  # imports flashdrive_ros.data
    clip_ids = args.clips.split(",") if args.clips else None
    source = DatasetSource(root, revision, clip_ids)
    clips = source.clip_ids()[: args.max_clips] if args.max_clips else source.clip_ids()

    start = time.time()
    run = run_evaluation(
        source, configs, clip_ids=clips, stride_us=args.stride_ms * 1000,
        start_us=None if args.t0_start is None else int(round(args.t0_start * 1e6)),
        end_us=None if args.t0_end is None else int(round(args.t0_end * 1e6)),
        max_windows=args.max_windows, warmup=args.warmup, plot_clips=0 if args.no_plots else args.plot_clips,
        plot_windows_per_clip=args.plot_windows, progress=not args.no_progress,
        keep_trajectories=args.save_trajectories)
    meta = {"dataset": str(root), "revision": revision, "stride_ms": args.stride_ms, "warmup": args.warmup,
            "argv": list(sys.argv[1:] if argv is None else argv), "elapsed_s": round(time.time() - start, 2)}
    result = write_report(run, args.out, meta, plots=not args.no_plots)
    print(result["markdown"])
    print(f"wrote {result['paths']['json']}, {result['paths']['markdown']}"
          + ("" if args.no_plots else f", {len(result['paths']['plots'])} plot(s) in {args.out / 'plots'}"),
          file=sys.stderr)
    return 1 if run.failed_configs else 0


if __name__ == "__main__":
    sys.exit(main())
