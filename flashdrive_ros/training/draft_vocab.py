"""Draft vocabularies for the DFlash drafter (docs/SPECULATIVE.md "Draft vocabulary").

Build one from the reasoning tokens of the drafter's training rollouts (flashdrive_ros.training.dflash_data)
and save a copy of a drafter that uses it:
    python -m flashdrive_ros.training.draft_vocab --rollouts runs/dflash/rollouts_train.pt --size 64 \
        --drafter flashdrive_ros/assets/tiny_dflash --out runs/dflash/drafter_v64
  ids = the `size` most frequent generated ids (the 8 prompt context slots and trajectory ids are not
  counted), always with <|cot_end|> and <|traj_future_start|>; when the rollouts hold fewer distinct
  ids than `size`, the smallest unseen non-trajectory ids fill it up (so K = size).

Measure tau with and without a draft vocabulary of several sizes (greedy, streaming, held-out clips; an
autoregressive engine and one speculative engine per size run every window in turn):
    python -m flashdrive_ros.training.draft_vocab --eval --rollouts runs/dflash/rollouts_train.pt \
        --data runs/dflash/data --clips 10: --windows-per-clip 15 --sizes 0,1024,64,48,32,16,8
  size 0 = no draft vocabulary (the whole target vocabulary). Prints one row per size: K, the share of
  the held-out reasoning tokens inside the vocabulary, whether every window's reasoning equals the
  autoregressive one, tau, verify passes per window, decode-stage ms (mean / median), and the time of
  one draft pass alone (drafter forward + head + greedy ids, median of --draft-reps calls on a fixed
  input; the sizes take turns call by call, so machine load falls on all of them alike).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from flashdrive_ros.engine.speculative import build_draft_vocab, load_drafter, save_drafter

DEFAULT_DRAFTER = Path(__file__).resolve().parents[1] / "assets" / "tiny_dflash"


def rollout_vocab(rollouts: str | Path, size: int, ids) -> torch.Tensor:
    """The `size` most frequent generated ids of the rollouts (+ <|cot_end|>, <|traj_future_start|>)."""
    data = torch.load(rollouts, weights_only=False)
    seqs = [s["tokens"] for s in data["sequences"]]  # -100 for the prompt context slots (ignored)
    return build_draft_vocab(seqs, size, always=(ids.cot_end, ids.traj_future_start),
                             vocab_size=ids.vocab_size, exclude=(ids.traj_start, ids.traj_end))


def _engine(model: str, drafter, device: str, max_new_tokens: int, speculative: bool = True):
    from flashdrive_ros.engine.engine import DriveEngine

    common = dict(streaming=True, max_new_tokens=max_new_tokens, flow_schedule="adaptive", temperature=0.0,
                  device=device)
    if not speculative:
        return DriveEngine.from_pretrained(model, **common)
    return DriveEngine.from_pretrained(model, speculative=True, drafter=drafter, **common)


def _draft_pass_ms(engines: list, reps: int) -> list[float]:
    """Median ms of one draft pass (drafter.draft_logits + draft_greedy on an anchor and a fixed context)
    per engine; the engines take turns call by call, so load on a shared machine hits them alike."""
    calls = []
    for engine in engines:
        d, m = engine.drafter, engine.model
        ctx = torch.randn(1, d.cfg.context_len, len(d.cfg.target_layers) * d.cfg.hidden_size,
                          generator=torch.Generator().manual_seed(0)).to(engine.device, engine.dtype)
        anchor = torch.tensor([engine.ids.cot_start], device=engine.device)
        banned = (engine.ids.traj_start, engine.ids.traj_end)
        calls.append(lambda d=d, m=m, anchor=anchor, ctx=ctx, banned=banned:
                     d.draft_greedy(d.draft_logits(m, anchor, ctx), banned))
    times = [[] for _ in engines]
    with torch.no_grad():
        for i in range(reps + 5):
            for j, call in enumerate(calls):
                t0 = time.perf_counter()
                call()
                if engines[j].device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 5:
                    times[j].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def evaluate(args) -> list[dict]:
    from flashdrive_ros.data import WindowReader
    from flashdrive_ros.training.dataset import find_revision

    from .dflash_data import parse_slice

    sizes = [int(s) for s in args.sizes.split(",")]
    reader = WindowReader(args.data, find_revision(args.data))
    clips = [reader.clip_ids()[i] for i in parse_slice(args.clips, len(reader.clip_ids()))]
    windows = [(c, int(t0)) for c in clips for t0 in reader.t0_grid(c)[:args.windows_per_clip]]

    ar_engine = _engine(args.model, None, args.device, args.max_new_tokens, speculative=False)
    ids, target = ar_engine.ids, ar_engine.model
    engines = [ar_engine]
    for k in sizes:
        drafter = load_drafter(args.drafter, target)
        if k:
            drafter.set_draft_vocab(rollout_vocab(args.rollouts, k, ids))
        engines.append(_engine(args.model, drafter, args.device, args.max_new_tokens))
    # warm-up windows of the first clip (one-time costs), not recorded
    for eng in engines:
        eng.reset()
        for t0 in reader.t0_grid(clips[0])[:args.warmup_windows]:
            w = reader.read_window(clips[0], int(t0))
            eng.step(w.frames, int(w.t0_us), w.ego_history_xyz, w.ego_history_rot)
    # every engine runs each window in turn (load on a shared machine falls on all of them alike)
    results = [[] for _ in engines]
    last = None
    for clip, t0 in windows:
        if clip != last:
            for eng in engines:
                eng.reset()
            last = clip
        w = reader.read_window(clip, t0)
        for eng, out in zip(engines, results):
            out.append(eng.step(w.frames, t0, w.ego_history_xyz, w.ego_history_rot))
    ar = results[0]
    steady = [i for i, r in enumerate(ar) if not r.full_prefill]
    held_out = [t for i in steady for t in ar[i].token_ids]
    table = []
    for k, eng, spec in zip(sizes, engines[1:], results[1:]):
        vocab = set(eng.drafter.draft_vocab.tolist()) if eng.drafter.draft_vocab is not None else None
        n_pass = sum(spec[i].verify_passes for i in steady)
        emitted = sum(spec[i].tokens_per_pass * spec[i].verify_passes for i in steady)
        row = {"K": eng.drafter.draft_vocab_size, "size_arg": k,
               "coverage": 1.0 if vocab is None else sum(t in vocab for t in held_out) / max(len(held_out), 1),
               "identical": all(a.token_ids == s.token_ids for a, s in zip(ar, spec)),
               "tau": emitted / max(n_pass, 1), "passes_per_window": n_pass / len(steady),
               "decode_ms_mean": statistics.mean(spec[i].timings_ms["decode"] for i in steady),
               "decode_ms_median": statistics.median(spec[i].timings_ms["decode"] for i in steady)}
        table.append(row)
    for row, ms in zip(table, _draft_pass_ms(engines[1:], args.draft_reps)):
        row["draft_pass_ms"] = ms
        print(json.dumps(row), flush=True)
    ar_ms = [ar[i].timings_ms["decode"] for i in steady]
    summary = {"windows": len(windows), "steady_windows": len(steady), "clips": len(clips),
               "held_out_tokens": len(held_out), "distinct_held_out_ids": len(set(held_out)),
               "decode_ms_ar_mean": statistics.mean(ar_ms), "decode_ms_ar_median": statistics.median(ar_ms),
               "vocab_size": ids.vocab_size, "threads": torch.get_num_threads(), "device": args.device,
               "drafter": str(args.drafter), "rollouts": str(args.rollouts)}
    print(json.dumps(summary), flush=True)
    print()
    print(f"autoregressive decode: {summary['decode_ms_ar_mean']:.1f} / {summary['decode_ms_ar_median']:.1f} ms "
          f"(mean / median) over {len(steady)} streamed windows; {len(held_out)} reasoning tokens, "
          f"{summary['distinct_held_out_ids']} distinct ids")
    print("| draft vocabulary K | held-out tokens inside | reasoning identical | τ | verify passes / window "
          "| decode ms mean / median | draft pass ms (median) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in table:
        name = f"{r['K']} (all)" if r["size_arg"] == 0 else f"{r['K']}"
        print(f"| {name} | {100 * r['coverage']:.1f} % | {r['identical']} | {r['tau']:.2f} | "
              f"{r['passes_per_window']:.2f} | {r['decode_ms_mean']:.1f} / {r['decode_ms_median']:.1f} | "
              f"{r['draft_pass_ms']:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": table}, indent=2) + "\n")
    return table


def build(args) -> None:
    from flashdrive_ros.engine.engine import DriveEngine

    engine = DriveEngine.from_pretrained(args.model, streaming=False)
    model, ids = engine.model, engine.ids
    vocab = rollout_vocab(args.rollouts, args.size, ids)
    drafter = load_drafter(args.drafter, model)
    drafter.set_draft_vocab(vocab)
    notes = json.loads((Path(args.drafter) / "drafter_config.json").read_text()).get("notes") or {}
    notes = {**notes, "draft_vocab": {"size": int(vocab.numel()), "from_rollouts": str(args.rollouts),
                                      "always": [ids.cot_end, ids.traj_future_start]}}
    save_drafter(drafter, args.out, extra=notes)
    print(f"saved {args.out}: draft vocabulary of {vocab.numel()} ids: {vocab.tolist()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", action="store_true", help="measure tau per draft-vocabulary size")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rollouts", required=True, help="rollouts .pt of the drafter's training (dflash_data)")
    ap.add_argument("--drafter", default=str(DEFAULT_DRAFTER))
    # build
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", help="output drafter directory (build)")
    # eval
    ap.add_argument("--data", help="dataset cache dir (eval)")
    ap.add_argument("--clips", default=None, help="python slice over the clip list, e.g. 10:")
    ap.add_argument("--windows-per-clip", type=int, default=15)
    ap.add_argument("--sizes", default="0,1024,64,48,32,16,8")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--warmup-windows", type=int, default=2)
    ap.add_argument("--draft-reps", type=int, default=200)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.eval:
        if not a.data:
            ap.error("--eval needs --data")
        evaluate(a)
    else:
        if not a.out:
            ap.error("building a drafter with a draft vocabulary needs --out")
        build(a)


if __name__ == "__main__":
    main(sys.argv[1:])
