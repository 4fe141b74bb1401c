"""DriveEngine at the FULL Alpamayo-1.5 shape (random bf16 weights made on the GPU) with cuda_graphs off vs on,
greedy and speculative (a random DFlash drafter with the real drafter config at full width).

Same streaming windows of synthetic 540x960 camera frames (180 image tokens per image, like 1080x1920)
for every run; the first `--warmup` windows (full prefill, graph builds, first streaming window) are not
measured. Runs one engine at a time over one shared model: eager greedy, eager speculative, then graphed
greedy and graphed speculative (the graphed engines fuse the projections in place, so the eager runs
come first and see the unfused model). Prints progress lines, a JSON summary, then a table (last).

Random weights: the drafter is untrained, so almost nothing is accepted (about 1 token per verify
pass); random logits also make bf16 near-ties likely, so graphed-vs-eager token equality is counted,
not assumed. Memory: one model (about 22 GB) + one engine's cache and graph pools at a time.

    python scripts/gpu_engine_full.py [--windows 8] [--warmup 2] [--max-new-tokens 24]
    python scripts/gpu_engine_full.py --shape tiny --device cpu --dtype float32 --windows 2   # CPU check
"""
import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdrive_ros.bench.ours import build_model, random_init_  # noqa: E402
from flashdrive_ros.engine.config import full_config, tiny_config, with_tokenizer_ids  # noqa: E402
from flashdrive_ros.engine.engine import DriveEngine  # noqa: E402
from flashdrive_ros.engine.loader import TINY_DIR  # noqa: E402
from flashdrive_ros.engine.speculative import Drafter, DrafterConfig  # noqa: E402

STAGES = ("preprocess", "encode", "prefill", "decode", "action", "total")
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- tokenizer
class _Backend:
    """The tiny tokenizers.Tokenizer for text runs; decode drops ids it does not have (the filler range)."""

    def __init__(self, tok, n_text: int):
        self.tok, self.n_text = tok, n_text

    def encode(self, *a, **kw):
        return self.tok.encode(*a, **kw)

    def encode_batch(self, *a, **kw):
        return self.tok.encode_batch(*a, **kw)

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode([i for i in ids if i < self.n_text], skip_special_tokens=skip_special_tokens)


class WideVocabTokenizer:
    """The shipped tiny tokenizer laid out like the real one: its base ids (text + the Qwen specials,
    < 1024) unchanged, its <ik> and Alpamayo special tokens moved up to start at `traj_start`
    (151669 at the full shape). Ids in between exist only in the model's embedding table. Enough for
    build_prompt / TokenIds / extract_reasoning; the prompt text is the real prompt's text in the tiny
    vocabulary (fewer text tokens, same image blocks)."""

    def __init__(self, traj_start: int):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(TINY_DIR / "tokenizer.json"))
        vocab = tok.get_vocab()
        self.base = vocab["<i0>"]
        self.shift = traj_start - self.base
        self._vocab = {t: (i if i < self.base else i + self.shift) for t, i in vocab.items()}
        self.backend_tokenizer = _Backend(tok, self.base)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


# ------------------------------------------------------------------------------------------- inputs
def make_clip(n_windows: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (4, n_windows + 3, h, w, 3), dtype=np.uint8)


def windows(clip: np.ndarray):
    """Streaming windows 0.1 s apart: window i holds frames i..i+3 of every camera (oldest first)."""
    hist = np.zeros((16, 3), np.float32)
    hist[:, 0] = np.linspace(-15.0, 0.0, 16)
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (16, 3, 3)).copy()
    for i in range(clip.shape[1] - 3):
        yield np.ascontiguousarray(clip[:, i:i + 4]), 1_700_000 + i * 100_000, hist, rot


def random_drafter(model, seed: int) -> Drafter:
    """Untrained DFlash drafter with the real config (target layers 24,30,31,32,34 at 36 layers), built on
    the model's device, MASK embedding = mean target embedding (as Drafter.for_target)."""
    cfg = DrafterConfig.for_target(model.cfg.text)
    with torch.device(model.device):
        drafter = Drafter(cfg)
    random_init_(drafter, seed)
    drafter = drafter.to(model.dtype).eval().requires_grad_(False)
    with torch.no_grad():
        drafter.mask_embedding.copy_(model.language_model.embed_tokens.weight.float().mean(0))
    return drafter


# ------------------------------------------------------------------------------------------- runs
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model, tok, drafter, clip, args, graphs: bool, speculative: bool) -> dict:
    dev = model.device
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    name = f"{'graphed' if graphs else 'eager'} {'speculative' if speculative else 'greedy'}"
    t = time.perf_counter()
    eng = DriveEngine(model, tok, streaming=True, flow_schedule=args.flow, speculative=speculative,
                      drafter=drafter if speculative else None, max_new_tokens=args.max_new_tokens,
                      cuda_graphs=graphs, weights_description="random full-shape weights")
    res, wall = [], []
    for i, win in enumerate(windows(clip)):
        t0 = time.perf_counter()
        res.append(eng.step(*win))
        sync(dev)
        wall.append(1e3 * (time.perf_counter() - t0))
        r = res[-1]
        log(f"{name}: window {i} {'full' if r.full_prefill else 'stream'} total {r.timings_ms['total']:.1f} ms "
            f"(wall {wall[-1]:.1f}) tokens {r.num_tokens} passes {r.verify_passes} forwards {r.decode_forwards} "
            f"prefill_tokens {r.prefill_tokens}")
    meas = res[args.warmup:] or res
    out = {
        "name": name, "graphs": graphs, "speculative": speculative,
        "stage_median_ms": {s: statistics.median(r.timings_ms[s] for r in meas) for s in STAGES},
        "wall_median_ms": statistics.median(wall[args.warmup:] or wall),
        "first_window_ms": res[0].timings_ms["total"],
        "first_window_wall_ms": wall[0],
        "tokens": [list(r.token_ids) for r in res],
        "num_tokens": [r.num_tokens for r in res],
        "verify_passes": [r.verify_passes for r in res],
        "prefill_tokens": [r.prefill_tokens for r in res],  # > 1: temporal draft ids accepted in the prefill
        "decode_forwards": [r.decode_forwards for r in res],
        "tokens_per_pass": [r.tokens_per_pass for r in res],
        "xyz": [r.xyz for r in res],
        "full_prefill": [r.full_prefill for r in res],
        "host_reads": eng._fast.host_reads if eng._fast is not None else None,
        "graphs_built": sorted({k[0] for k in eng._fast.graphs}) if eng._fast is not None else [],
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan"),
    }
    out["run_s"] = time.perf_counter() - t  # engine construction + every window (graph builds included)
    del eng
    gc.collect()
    return out


def rounded(x, nd: int = 2):
    if isinstance(x, float):
        return round(x, nd) if abs(x) >= 1e-3 or x == 0 else float(f"{x:.3g}")
    if isinstance(x, dict):
        return {k: rounded(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, nd) for v in x]
    return x


def equal_count(a: dict, b: dict, skip: int) -> str:
    pairs = list(zip(a["tokens"], b["tokens"]))[skip:]
    return f"{sum(x == y for x, y in pairs)}/{len(pairs)}"


def table(runs: list[dict], skip: int) -> str:
    head = (f"{'run':<20}" + "".join(f"{s:>11}" for s in STAGES)
            + f"{'wall':>9}{'tok/win':>9}{'passes':>8}{'fwds':>7}{'tok/pass':>9}{'peak GiB':>9}")
    lines = [head, "-" * len(head)]
    for r in runs:
        m = r["stage_median_ms"]
        sl = slice(skip, None)
        tok = statistics.mean(r["num_tokens"][sl] or r["num_tokens"])
        passes = statistics.mean(r["verify_passes"][sl] or r["verify_passes"])
        fwds = statistics.mean(r["decode_forwards"][sl] or r["decode_forwards"])
        tpp = statistics.mean(r["tokens_per_pass"][sl] or r["tokens_per_pass"])
        lines.append(f"{r['name']:<20}" + "".join(f"{m[s]:>11.2f}" for s in STAGES)
                     + f"{r['wall_median_ms']:>9.1f}{tok:>9.1f}{passes:>8.1f}{fwds:>7.1f}{tpp:>9.2f}"
                     + f"{r['peak_gib']:>9.1f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("full", "tiny"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--windows", type=int, default=8, help="measured streaming windows")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured first windows (full prefill, builds)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--flow", default="adaptive", choices=("uniform", "adaptive"))
    ap.add_argument("--height", type=int, default=540)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--runs", default="eager-greedy,eager-spec,graphed-greedy,graphed-spec",
                    help="comma list, in this order (eager runs must come before graphed ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        log(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    base = full_config() if args.shape == "full" else tiny_config()
    tok = WideVocabTokenizer(base.traj_token_start_idx)
    cfg = with_tokenizer_ids(base, tok.get_vocab())
    torch.manual_seed(args.seed)
    model = build_model(cfg, dtype, device, seed=args.seed)
    drafter = random_drafter(model, args.seed + 1)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.shape} model: {n_params / 1e9:.2f} B params, drafter {sum(p.numel() for p in drafter.parameters()) / 1e6:.0f} M, "
        f"{torch.cuda.memory_allocated() / 2 ** 30:.1f} GiB allocated" if device.type == "cuda" else
        f"{args.shape} model: {n_params / 1e9:.3f} B params")
    clip = make_clip(args.warmup + args.windows, args.height, args.width, args.seed)

    runs = {}
    for spec_name in args.runs.split(","):
        mode, kind = spec_name.strip().split("-")
        runs[spec_name] = run(model, tok, drafter, clip, args, graphs=mode == "graphed",
                              speculative=kind == "spec")
        r = runs[spec_name]
        log(f"{r['name']}: done in {r['run_s']:.1f} s, peak {r['peak_gib']:.1f} GiB, graphs {r['graphs_built']}")

    skip = args.warmup
    summary = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": args.dtype, "params_b": n_params / 1e9, "windows": args.windows, "warmup": args.warmup,
               "max_new_tokens": args.max_new_tokens, "runs": {}}
    for k, r in runs.items():
        summary["runs"][k] = {key: r[key] for key in ("stage_median_ms", "wall_median_ms", "first_window_ms",
                                                      "first_window_wall_ms", "run_s", "num_tokens",
                                                      "verify_passes", "decode_forwards", "tokens_per_pass", "host_reads",
                                                      "graphs_built", "peak_gib")}
    eq = {}
    for a, b, label in (("eager-greedy", "graphed-greedy", "greedy graphed == eager"),
                        ("eager-spec", "graphed-spec", "speculative graphed == eager"),
                        ("eager-greedy", "eager-spec", "eager speculative == greedy"),
                        ("graphed-greedy", "graphed-spec", "graphed speculative == greedy")):
        if a in runs and b in runs:
            eq[label] = equal_count(runs[a], runs[b], skip)
            if runs[a]["speculative"] == runs[b]["speculative"] and runs[a]["speculative"]:
                pa, pb = runs[a]["verify_passes"][skip:], runs[b]["verify_passes"][skip:]
                eq[label + " (same verify passes)"] = f"{sum(x == y for x, y in zip(pa, pb))}/{len(pa)}"
            xa, xb = runs[a]["xyz"][skip:], runs[b]["xyz"][skip:]
            eq[label + " max |dxyz| m"] = float(max(np.abs(x - y).max() for x, y in zip(xa, xb)))
    summary["tokens_equal"] = eq
    summary = rounded(summary)
    print(json.dumps(summary, indent=1, default=float), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(f"\n{args.shape} shape, {args.dtype}, median over {args.windows} streaming windows after {args.warmup} "
          f"warm-up, max_new_tokens {args.max_new_tokens}; stage ms (CUDA events), wall ms per window")
    for label, v in eq.items():
        print(f"  {label}: {v}")
    print(table(list(runs.values()), skip), flush=True)


if __name__ == "__main__":
    main()
