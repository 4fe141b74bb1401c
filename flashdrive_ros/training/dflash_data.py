"""DFlash drafter training data from target rollouts (flashdrive.md §4 "Training").

For every window of the given clips (data.WindowReader):
  1. rollout: full prefill (non-streaming, as the reference's data generation) + the target's own
     reasoning, sampled at temperature 0.6 / top-p 0.98 by default (greedy with --temperature 0),
     closed by <|cot_end|> <|traj_future_start|> exactly like inference;
  2. teacher forcing: one forward over the generated ids + <|traj_future_start|> at their decode slots
     (the prompt is already in the cache), capturing the drafter's target layers. With the last 8
     prompt positions captured by the prefill this gives the target hidden states of every position
     from L - 8 to the end.
Per window we store that sequence (`feats` [8 + T, n_layers * H] float16, `tokens` [8 + T], the first 8
tokens being the prompt's last 8), not the blocks: training cuts sliding blocks (stride 1) from it —
anchor at sequence index j >= 8, context = feats[j - 8 : j] (the 8 positions BEFORE the anchor, which
is what inference has when it drafts), labels = tokens[j + 1 : j + 8] (<|cot_end|> and
<|traj_future_start|> kept; -100 past the end).

    python -m flashdrive_ros.training.dflash_data --data runs/dflash/data --out runs/dflash/rollouts.pt \
        [--model tiny] [--clips 0:10] [--stride-ms 200] [--rollouts 2] [--temperature 0.6]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.speculative import CONTEXT_LEN, Drafter, context_features, target_fingerprint
from flashdrive_ros.engine.streaming import causal_mask

IGNORE = -100


@torch.no_grad()
def rollout_features(engine: DriveEngine, window, gen: torch.Generator) -> dict:
    """One rollout of the target on a window + teacher-forced hidden states (see the module docstring).

    `engine` must be non-streaming and built with speculative=True (any drafter: it only fixes which
    layers the prefill captures; greedy/sampled output does not depend on it)."""
    engine.reset()
    logits, layout, _ = engine.prefill(window.frames, int(window.t0_us), window.ego_history_xyz)
    prompt_ctx = engine._context[0]  # [8, n*H] captured by the prefill for the drafter
    start = layout.length
    tokens, n_generated, _, n_ctx, _, _ = engine.decode(logits, start, gen)
    seq = torch.tensor(tokens + [engine.ids.traj_future_start], device=engine.device)
    slots = start + torch.arange(seq.numel(), device=engine.device)
    if slots[-1] + 1 != n_ctx:
        raise RuntimeError(f"decode left n_ctx {n_ctx}, expected {int(slots[-1]) + 1}")
    lm = engine.model.language_model
    _, cap = lm(engine.model.embed(seq[None]), engine.cache, slots, causal_mask(slots, n_ctx, engine.dtype),
                n_ctx, capture_layers=engine._capture_layers)
    feats = torch.cat([prompt_ctx, context_features(cap, engine._capture_layers)[0]], dim=0)
    return {
        "feats": feats.to("cpu", torch.float16),
        # the 8 prompt positions are context only (never anchors or labels)
        "tokens": torch.cat([torch.full((CONTEXT_LEN,), IGNORE), seq.cpu()]),
        "n_generated": n_generated,
    }


def sliding_blocks(tokens: torch.Tensor, block_size: int, context_len: int = CONTEXT_LEN):
    """(anchor index j, labels [block_size - 1]) for every anchor that inference can meet: the
    generated tokens before <|cot_end|> (sequence indices context_len .. T - 3; the last two are
    <|cot_end|> and <|traj_future_start|>, which are labels only)."""
    out = []
    last = tokens.numel() - 3
    for j in range(context_len, last + 1):
        lab = tokens[j + 1:j + block_size]
        lab = torch.cat([lab, torch.full((block_size - 1 - lab.numel(),), IGNORE, dtype=lab.dtype)])
        out.append((j, lab))
    return out


def build_engine(model: str, target_layers, temperature: float, max_new_tokens: int, seed: int) -> DriveEngine:
    engine = DriveEngine.from_pretrained(model, streaming=False, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=0.98, seed=seed, speculative=True,
                                         drafter=None)
    if target_layers is not None and tuple(target_layers) != engine._capture_layers:
        engine = DriveEngine(engine.model, engine.tokenizer, streaming=False, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=0.98, seed=seed, speculative=True,
                             drafter=Drafter.for_target(engine.model, tuple(target_layers)))
    return engine


def parse_slice(text: str | None, n: int) -> list[int]:
    if not text:
        return list(range(n))
    lo, _, hi = text.partition(":")
    return list(range(n))[slice(int(lo) if lo else None, int(hi) if hi else None)]


def generate(data: str, model: str = "tiny", clips: str | None = None, stride_ms: int = 200,
             rollouts: int = 1, temperature: float = 0.6, max_new_tokens: int = 64, seed: int = 0,
             target_layers=None, log=print) -> dict:
    from flashdrive_ros.data import WindowReader
    from flashdrive_ros.training.dataset import find_revision

    torch.manual_seed(seed)
    engine = build_engine(model, target_layers, temperature, max_new_tokens, seed)
    reader = WindowReader(data, find_revision(data))
    clip_ids = reader.clip_ids()
    chosen = [clip_ids[i] for i in parse_slice(clips, len(clip_ids))]
    sequences, meta = [], []
    gen = torch.Generator().manual_seed(seed)
    t_start = time.time()
    for ci, clip in enumerate(chosen):
        grid = reader.t0_grid(clip)
        step = max(1, stride_ms // 100)
        for t0 in grid[::step]:
            window = reader.read_window(clip, int(t0))
            for r in range(rollouts):
                s = rollout_features(engine, window, gen)
                sequences.append(s)
                meta.append({"clip": clip, "t0_us": int(t0), "rollout": r})
        n_tok = sum(s["n_generated"] for s in sequences)
        log(f"clip {ci + 1}/{len(chosen)} {clip}: {len(sequences)} rollouts, {n_tok} tokens, "
            f"{time.time() - t_start:.0f} s")
    return {"sequences": sequences, "meta": meta, "target_layers": list(engine._capture_layers),
            "model": str(model), "weights": engine.weights_description, **target_fingerprint(model),
            "temperature": temperature,
            "context_len": CONTEXT_LEN, "hidden_size": engine.cfg.text.hidden_size}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="generated dataset cache dir (data.synthetic_dataset / generate)")
    ap.add_argument("--out", required=True, help="output .pt")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clips", default=None, help="python slice over the dataset's clip list, e.g. 0:10")
    ap.add_argument("--stride-ms", type=int, default=200)
    ap.add_argument("--rollouts", type=int, default=1, help="rollouts per window (useful when sampling)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--target-layers", default=None, help="comma-separated target layers (default: per size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    layers = tuple(int(x) for x in a.target_layers.split(",")) if a.target_layers else None
    out = generate(a.data, a.model, a.clips, a.stride_ms, a.rollouts, a.temperature, a.max_new_tokens, a.seed,
                   layers, log=lambda m: print(m, flush=True))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, a.out)
    print(f"wrote {a.out}: {len(out['sequences'])} sequences", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
