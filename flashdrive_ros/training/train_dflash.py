"""Train the DFlash drafter on target rollouts, and measure it (flashdrive.md §4).

Train (data from flashdrive_ros.training.dflash_data):
    python -m flashdrive_ros.training.train_dflash --rollouts runs/dflash/rollouts.pt --out flashdrive_ros/assets/tiny_dflash \
        [--model tiny] [--epochs 40] [--batch 64] [--lr 1e-3] [--device cpu|cuda]
  * sliding blocks (stride 1) from every rollout: context = the 8 target hidden states before the
    anchor, input = [anchor, MASK x 7], labels = the next 7 tokens;
  * the target's embed_tokens / lm_head are shared and frozen; only the drafter trains;
  * loss = cross-entropy over draft positions 1..7 weighted by exp(-k / gamma), gamma = 3, k = 0..6,
    weights normalised to mean 1 (earlier positions matter more: a miss ends the accepted prefix);
  * AdamW (0.9, 0.999), weight decay 0.01, 10 % linear warm-up then cosine, gradient clip 1.0;
    10 % of the rollouts held out for validation; the best validation loss is saved (safetensors +
    drafter_config.json, with the training summary in its "notes").

Measure on held-out clips (greedy, streaming engine, the same windows through both engines):
    python -m flashdrive_ros.training.train_dflash --eval --data runs/dflash/data --clips 10: \
        --drafter flashdrive_ros/assets/tiny_dflash [--model tiny] [--max-new-tokens 64] [--json out.json]
  prints tau (tokens per verification pass, bonus included, max 8), the decode-stage time of the
  autoregressive and the speculative engine and their ratio, and checks the reasoning is identical.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashdrive_ros.engine.loader import load_model
from flashdrive_ros.engine.speculative import CONTEXT_LEN, Drafter, load_drafter, save_drafter

from .dflash_data import IGNORE, sliding_blocks

GAMMA = 3.0


def position_weights(n: int, gamma: float = GAMMA) -> torch.Tensor:
    """exp(-k / gamma) for k = 0..n-1, normalised to mean 1."""
    w = torch.exp(-torch.arange(n, dtype=torch.float32) / gamma)
    return w / w.mean()


def weighted_block_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """logits [B, n, V], labels [B, n] (IGNORE = -100) -> prefix-weighted mean cross-entropy."""
    ce = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
    w = position_weights(labels.shape[1], gamma).to(ce.device)[None] * (labels != IGNORE)
    return (ce * w).sum() / w.sum().clamp_min(1e-9)


class Blocks:
    """All sliding blocks of a list of rollouts, gathered into batches of
    (context [B, 8, n*H], anchor ids [B], labels [B, block_size - 1])."""

    def __init__(self, sequences: list[dict], block_size: int):
        self.feats = [s["feats"] for s in sequences]
        self.tokens = [s["tokens"] for s in sequences]
        index, labels = [], []
        for si, tok in enumerate(self.tokens):
            for j, lab in sliding_blocks(tok, block_size):
                index.append((si, j))
                labels.append(lab)
        self.index = index
        self.labels = torch.stack(labels) if labels else torch.zeros(0, block_size - 1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, rows, device, dtype):
        ctx = torch.stack([self.feats[si][j - CONTEXT_LEN:j] for si, j in (self.index[r] for r in rows)])
        anchors = torch.tensor([int(self.tokens[si][j]) for si, j in (self.index[r] for r in rows)])
        return ctx.to(device, dtype), anchors.to(device), self.labels[rows].to(device)


def drafter_logits(drafter: Drafter, model, ctx, anchors, traj_start: int, traj_size: int) -> torch.Tensor:
    logits = drafter.draft_logits(model, anchors, ctx)
    logits[..., traj_start:traj_start + traj_size] = float("-inf")  # never drafted (as at inference)
    return logits


@torch.no_grad()
def evaluate_blocks(drafter, model, blocks: Blocks, batch: int, traj) -> dict:
    """Validation loss and the teacher-forced accept length (1 + leading correct greedy drafts)."""
    if len(blocks) == 0:
        return {"loss": float("nan"), "accept_len": float("nan"), "top1": float("nan")}
    drafter.eval()
    tot_loss, tot_acc, n_top1, n_valid, n = 0.0, 0.0, 0, 0, 0
    for lo in range(0, len(blocks), batch):
        rows = list(range(lo, min(lo + batch, len(blocks))))
        ctx, anchors, labels = blocks.batch(rows, model.device, model.dtype)
        logits = drafter_logits(drafter, model, ctx, anchors, *traj)
        tot_loss += float(weighted_block_loss(logits, labels)) * len(rows)
        ok = (logits.argmax(-1) == labels) & (labels != IGNORE)
        tot_acc += float((1 + ok.long().cumprod(1).sum(1)).sum())
        n_top1 += int(ok[:, 0].sum())
        n_valid += int((labels[:, 0] != IGNORE).sum())
        n += len(rows)
    return {"loss": tot_loss / n, "accept_len": tot_acc / n, "top1": n_top1 / max(n_valid, 1)}


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = torch.load(args.rollouts, weights_only=False)
    model = load_model(args.model, torch.float32, device)
    model.requires_grad_(False)
    cfg = model.cfg
    traj = (cfg.traj_token_start_idx, cfg.traj_vocab_size)
    drafter = Drafter.for_target(model, tuple(data["target_layers"]), seed=args.seed).float().to(device)
    seqs = data["sequences"]
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = max(1, len(seqs) // 10)
    val = Blocks([seqs[i] for i in order[:n_val]], drafter.cfg.block_size)
    tr = Blocks([seqs[i] for i in order[n_val:]], drafter.cfg.block_size)
    steps_per_epoch = math.ceil(len(tr) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = max(1, total // 10)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    print(f"{len(seqs)} rollouts -> {len(tr)} train / {len(val)} val blocks; {total} steps", flush=True)
    best, best_state, history = float("inf"), None, []
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        drafter.train()
        perm = torch.randperm(len(tr), generator=gen)
        run_loss = 0.0
        for b in range(steps_per_epoch):
            rows = perm[b * args.batch:(b + 1) * args.batch].tolist()
            ctx, anchors, labels = tr.batch(rows, device, model.dtype)
            loss = weighted_block_loss(drafter_logits(drafter, model, ctx, anchors, *traj), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
            opt.step()
            sched.step()
            run_loss += float(loss.detach())
        ev = evaluate_blocks(drafter, model, val, 256, traj)
        rec = {"epoch": epoch + 1, "train_loss": run_loss / steps_per_epoch, **{f"val_{k}": v for k, v in ev.items()},
               "elapsed_s": round(time.time() - t0, 1)}
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if ev["loss"] < best:
            best = ev["loss"]
            best_state = {k: v.detach().clone() for k, v in drafter.state_dict().items()}
    drafter.load_state_dict(best_state)
    summary = {"rollouts": args.rollouts, "model": args.model, "weights": data.get("weights"),
               "train_blocks": len(tr), "val_blocks": len(val), "epochs": args.epochs, "lr": args.lr,
               "batch": args.batch, "gamma": GAMMA, "best_val": min(history, key=lambda r: r["val_loss"]),
               "train_seconds": round(time.time() - t0, 1)}
    save_drafter(drafter, args.out, extra=summary)
    print(f"saved {args.out}: best val {json.dumps(summary['best_val'])}", flush=True)
    return {**summary, "history": history}


@torch.no_grad()
def measure(args) -> dict:
    """tau and decode-stage speed-up on held-out clips (see the module docstring)."""
    from flashdrive_ros.data import WindowReader
    from flashdrive_ros.engine.engine import DriveEngine
    from flashdrive_ros.training.dataset import find_revision

    from .dflash_data import parse_slice

    common = dict(streaming=True, max_new_tokens=args.max_new_tokens, flow_schedule="adaptive",
                  temperature=0.0, device=args.device)
    ar = DriveEngine.from_pretrained(args.model, **common)
    spec = DriveEngine.from_pretrained(args.model, speculative=True, drafter=args.drafter, **common)
    reader = WindowReader(args.data, find_revision(args.data))
    clips = [reader.clip_ids()[i] for i in parse_slice(args.clips, len(reader.clip_ids()))]
    rows = []
    for clip in clips:
        ar.reset()
        spec.reset()
        for t0 in reader.t0_grid(clip)[:args.windows_per_clip]:
            w = reader.read_window(clip, int(t0))
            inputs = (w.frames, int(w.t0_us), w.ego_history_xyz, w.ego_history_rot)
            a = ar.step(*inputs)
            s = spec.step(*inputs)
            rows.append({"clip": clip, "t0_us": int(t0), "same": a.token_ids == s.token_ids,
                         "tokens": s.num_tokens, "verify_passes": s.verify_passes,
                         "emitted_by_verify": s.tokens_per_pass * s.verify_passes,
                         "decode_ms_ar": a.timings_ms["decode"], "decode_ms_spec": s.timings_ms["decode"],
                         "full_prefill": s.full_prefill})
    steady = [r for r in rows if not r["full_prefill"]] or rows
    n_pass = sum(r["verify_passes"] for r in steady)
    out = {
        "drafter": str(args.drafter), "model": args.model, "weights": spec.weights_description,
        "windows": len(rows), "clips": len(clips), "identical_reasoning": all(r["same"] for r in rows),
        "tau": sum(r["emitted_by_verify"] for r in steady) / max(n_pass, 1),
        "mean_tokens": sum(r["tokens"] for r in steady) / len(steady),
        "mean_verify_passes": n_pass / len(steady),
        "decode_ms_ar": sum(r["decode_ms_ar"] for r in steady) / len(steady),
        "decode_ms_spec": sum(r["decode_ms_spec"] for r in steady) / len(steady),
        "device": args.device, "threads": torch.get_num_threads(),
    }
    out["decode_speedup"] = out["decode_ms_ar"] / out["decode_ms_spec"]
    print(json.dumps(out, indent=2), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": out, "windows": rows}, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", action="store_true", help="measure tau / decode speed-up instead of training")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    # train
    ap.add_argument("--rollouts", help="rollouts .pt from dflash_data")
    ap.add_argument("--out", help="output drafter directory")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    # eval
    ap.add_argument("--data", help="dataset cache dir (eval)")
    ap.add_argument("--clips", default=None, help="python slice over the clip list, e.g. 10:")
    ap.add_argument("--windows-per-clip", type=int, default=30)
    ap.add_argument("--drafter", default=None, help="drafter directory (eval)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.eval:
        if not (a.data and a.drafter):
            ap.error("--eval needs --data and --drafter")
        measure(a)
    else:
        if not (a.rollouts and a.out):
            ap.error("training needs --rollouts and --out")
        train(a)


if __name__ == "__main__":
    main(sys.argv[1:])
