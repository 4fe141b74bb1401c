"""Train the whole tiny VLA on cached windows of synthetic PhysicalAI-AV clips (alpamayo.md §4-9).

    python -m flashdrive_ros.training.train --data DIR --out DIR --steps N --seed S [--heldout DIR]

Per batch (teacher forcing, one fresh KV cache):
  * ids = prompt (ego-history tokens scattered in) ++ label ++ <|cot_end|> <|traj_future_start|>;
    the vision tower encodes the 16 images, their embeddings replace the <|image_pad|> ids and the
    deepstack features are added after the first decoder layers, exactly as in inference.
  * TextModel runs the whole sequence causally into a training StaticKVCache (same slots and
    M-RoPE position table as the engine's full prefill) -> next-token cross-entropy on the tokens
    after <|cot_start|>.
  * The action expert reads that cache up to and including <|traj_future_start|> (per-sample
    n_ctx) -> flow-matching MSE: x_t = t*a + (1-t)*noise, target v = a - noise, with
    t = 0.999 - 0.999*Beta(1.5, 1) (Alpamayo R1's schedule) and a = the normalized ground-truth
    (accel, curvature) actions.
  loss = CE + flow_weight * flow MSE; AdamW with warm-up + cosine decay; gradients reach every weight.

--data / --heldout take a generated dataset directory (its windows are cached once to
OUT/samples_*.pt, see dataset.py) or a sample cache .pt. Periodic evaluation on held-out windows
reports teacher-forced token accuracy, the fraction of windows whose whole reasoning is predicted
(= what greedy decoding produces), and trajectory ADE@6.4s of 10-step flow next to a
constant-velocity extrapolation on the same windows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from flashdrive_ros.engine.action_space import UnicycleActionSpace
from flashdrive_ros.engine.flow import FlowSchedule, sample as flow_sample
from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny, load_model, save_model
from flashdrive_ros.engine.rope import apply_rotary, extend_positions, rope_index
from flashdrive_ros.engine.streaming import causal_mask
from flashdrive_ros.engine.tokens import TokenIds

from .dataset import SampleSet, build_samples, find_revision, load_cfg_and_tokenizer

N_WAYPOINTS = 64
IGNORE = -100


# ------------------------------------------------------------------------------------ KV cache
class TrainingKVCache(StaticKVCache):
    """A StaticKVCache that autograd can differentiate through.

    StaticKVCache writes in place into one [layers, ...] tensor, so layer i+1's write bumps the
    version of the keys layer i saved for backward. Here every write builds new per-layer tensors
    (index_copy, out of place); reads, slot positions and rotation are the same as the engine's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._k = [self.k[i] for i in range(self.n_layers)]
        self._v = [self.v[i] for i in range(self.n_layers)]
        self._k_rot = [self.k_rot[i] for i in range(self.n_layers)]

    def write(self, layer, slots, k, v, check: bool = True) -> None:
        if check:
            slots = self._check_slots(slots, "slots")
        k, v = k.to(self.dtype), v.to(self.dtype)
        if k.shape[0] != self.batch:
            k, v = k.expand(self.batch, -1, -1, -1), v.expand(self.batch, -1, -1, -1)
        self._k[layer] = self._k[layer].index_copy(2, slots, k)
        self._v[layer] = self._v[layer].index_copy(2, slots, v)
        self._k_rot[layer] = self._k_rot[layer].index_copy(2, slots, apply_rotary(k, *self.cos_sin(slots)))

    def shift(self, src_slots, dst_slots) -> None:
        raise RuntimeError("TrainingKVCache is for teacher forcing only: slot shifts belong to streaming, which uses the engine's StaticKVCache")

    def rotated_keys(self, layer: int, n: int) -> torch.Tensor:
        return self._k_rot[layer][:, :, :n]

    def values(self, layer: int, n: int) -> torch.Tensor:
        return self._v[layer][:, :, :n]


class RepeatedCache:
    """Read-only view of a batch-B cache as batch B*r (each row repeated r times, consecutively),
    so r flow-matching draws per sample go through the expert in one batch."""

    def __init__(self, cache, r: int):
        self.cache, self.r = cache, r
        for name in ("n_layers", "n_kv_heads", "head_dim", "max_len", "device", "positions", "dtype"):
            setattr(self, name, getattr(cache, name))
        self.batch = cache.batch * r

    def rotated_keys(self, layer: int, n: int) -> torch.Tensor:
        return self.cache.rotated_keys(layer, n).repeat_interleave(self.r, dim=0)

    def values(self, layer: int, n: int) -> torch.Tensor:
        return self.cache.values(layer, n).repeat_interleave(self.r, dim=0)


@contextlib.contextmanager
def batched_deepstack(language_model, visual_mask: torch.Tensor, deepstack: list[torch.Tensor]):
    """Add per-sample deepstack features [B, n_vis, H] after decoder layer i (what TextModel does
    for one sample with its `deepstack` argument), via forward hooks on the layers."""
    handles = []
    for i, feat in enumerate(deepstack[:len(language_model.layers)]):
        def hook(module, args, out, feat=feat):
            out = out.clone()
            out[:, visual_mask] = out[:, visual_mask] + feat.to(out.dtype)
            return out
        handles.append(language_model.layers[i].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ batches
def flow_times(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """t = 0.999 - 0.999 * Beta(1.5, 1) (inverse CDF of Beta(a, 1) is u^(1/a)); t = 1 is data."""
    u = torch.rand(n, generator=generator)
    return (0.999 - 0.999 * u.pow(1.0 / 1.5)).to(device)


def action_positions_for(cache, n_ctx: torch.Tensor) -> torch.Tensor:
    """[B, 3, 64]: the 64 action tokens continue after each sample's last context slot (engine rule)."""
    start = cache.positions[:, n_ctx - 1].max(dim=0).values + 1  # [B]
    pos = start[:, None] + torch.arange(N_WAYPOINTS, device=start.device)[None]
    return pos[:, None, :].expand(-1, 3, -1)


def flow_matching_loss(model, cache, n_ctx: torch.Tensor, actions: torch.Tensor, generator: torch.Generator,
                       repeats: int = 1) -> torch.Tensor:
    """MSE between the expert's velocity and a - noise at x_t = t*a + (1-t)*noise.

    cache: batch B (shared context per sample), n_ctx LongTensor [B], actions [B, 64, 2] normalized.
    """
    b = actions.shape[0]
    device = actions.device
    a = actions.repeat_interleave(repeats, dim=0)
    noise = torch.randn(a.shape, generator=generator).to(device, a.dtype)
    t = flow_times(a.shape[0], generator, device).to(a.dtype)
    x_t = t[:, None, None] * a + (1 - t[:, None, None]) * noise
    ctx = cache if repeats == 1 else RepeatedCache(cache, repeats)
    n = n_ctx.repeat_interleave(repeats)
    pos = action_positions_for(cache, n_ctx).repeat_interleave(repeats, dim=0)
    hidden = model.expert(model.action_in_proj(x_t, t), ctx, n, pos)
    v = model.action_velocity(hidden)
    return F.mse_loss(v, (a - noise).float())


class Batcher:
    """Turns sample indices into model inputs on a device (positions shared by all samples)."""

    def __init__(self, samples: SampleSet, ids: TokenIds, cfg, device):
        self.s, self.ids, self.cfg, self.device = samples, ids, cfg, torch.device(device)
        if self.device.type == "cuda":  # gather + patchify on the GPU (frames are ~86 KB each)
            samples.frames = samples.frames.to(self.device)
        prompt0 = samples.prompt_ids[0]
        self.visual_prompt = prompt0 == ids.image_pad
        _, grid = samples.pixels([0])
        self.prompt_positions, _ = rope_index(prompt0, grid, ids.image_pad, cfg.vision.spatial_merge_size)
        self.max_target = max(len(t) for t in samples.target_ids)

    def __call__(self, index):
        s, L = self.s, self.s.prompt_len
        index = list(index)
        tlen = max(len(s.target_ids[i]) for i in index)
        T = L + tlen
        ids = torch.full((len(index), T), self.ids.cot_end, dtype=torch.long)
        labels = torch.full((len(index), tlen), IGNORE, dtype=torch.long)
        ids[:, :L] = s.prompt_ids[index]
        for b, i in enumerate(index):
            tgt = torch.tensor(s.target_ids[i])
            ids[b, L:L + len(tgt)] = tgt
            labels[b, :len(tgt)] = tgt
        n_ctx = torch.tensor([L + len(s.target_ids[i]) for i in index])  # through <|traj_future_start|>
        visual = torch.zeros(T, dtype=torch.bool)
        visual[:L] = self.visual_prompt
        pixels, grid = s.pixels(index, device=self.device)
        return dict(ids=ids.to(self.device), labels=labels.to(self.device), n_ctx=n_ctx.to(self.device),
                    visual=visual.to(self.device), pixels=pixels, grid=grid.to(self.device),
                    positions=extend_positions(self.prompt_positions, T).to(self.device),
                    actions=s.action[index].to(self.device), prompt_len=L)


def teacher_forced(model, batch: dict) -> tuple[torch.Tensor, TrainingKVCache]:
    """Logits [B, T_target, V] for the tokens after <|cot_start|>, and the filled cache."""
    ids, visual = batch["ids"], batch["visual"]
    b, T = ids.shape
    L = batch["prompt_len"]
    feats = model.encode_images(batch["pixels"], batch["grid"])
    n_vis = int(visual.sum())
    embeds = model.embed(ids)
    embeds[:, visual] = feats.embeds.reshape(b, n_vis, -1).to(embeds.dtype)
    deepstack = [d.reshape(b, n_vis, -1) for d in feats.deepstack]
    lm = model.language_model
    cache = TrainingKVCache.for_config(lm.cfg, b, T, batch["positions"], embeds.dtype, ids.device)
    slots = torch.arange(T, device=ids.device)
    with batched_deepstack(lm, visual, deepstack):
        hidden, _ = lm(embeds, cache, slots, causal_mask(slots, T, embeds.dtype), T)
    logits = model.logits(hidden[:, L - 1:T - 1])
    return logits, cache


def batch_losses(model, batch: dict, generator: torch.Generator, flow_repeats: int = 1) -> dict:
    logits, cache = teacher_forced(model, batch)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE)
    fm = flow_matching_loss(model, cache, batch["n_ctx"], batch["actions"], generator, flow_repeats)
    return {"ce": ce, "flow": fm, "logits": logits}


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model, batcher: Batcher, indices, batch_size: int = 8, seed: int = 0) -> dict:
    """Held-out metrics with teacher-forced reasoning context (see the module docstring)."""
    model.eval()
    s, ids = batcher.s, batcher.ids
    action_space = UnicycleActionSpace(model.cfg.action_space)
    gen = torch.Generator().manual_seed(seed)
    tok_ok = tok_n = exact = 0
    ade, ade_cv, ce_sum = [], [], 0.0
    schedule = FlowSchedule.uniform(10)
    from flashdrive_ros.evaluation.metrics import constant_velocity_prediction
    for start in range(0, len(indices), batch_size):
        index = list(indices[start:start + batch_size])
        batch = batcher(index)
        logits, cache = teacher_forced(model, batch)
        labels = batch["labels"]
        ce_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        ignore_index=IGNORE, reduction="sum"))
        masked = logits.clone()
        masked[..., ids.traj_start:ids.traj_end] = float("-inf")  # the engine never emits trajectory ids
        pred = masked.argmax(-1)
        valid = labels != IGNORE
        tok_ok += int(((pred == labels) & valid).sum())
        tok_n += int(valid.sum())
        exact += int(((pred == labels) | ~valid).all(dim=1).sum())
        n_ctx = batch["n_ctx"]
        pos = action_positions_for(cache, n_ctx)

        def velocity(x, t):
            return model.action_velocity(model.expert(model.action_in_proj(x, t), cache, n_ctx, pos))

        noise = torch.randn((len(index), N_WAYPOINTS, 2), generator=gen).to(n_ctx.device)
        act = flow_sample(velocity, noise, schedule).double().cpu()
        traj = action_space.action_to_trajectory(act, s.hist_xyz[index], s.hist_rot[index])
        err = (traj.xyz[..., :2] - s.fut_xyz[index][..., :2]).norm(dim=-1).mean(-1)
        ade += err.tolist()
        for i in index:
            cv = constant_velocity_prediction(s.hist_xyz[i].numpy(), N_WAYPOINTS)[0]
            ade_cv.append(float(np.linalg.norm(cv[:, :2] - s.fut_xyz[i, :, :2].numpy(), axis=-1).mean()))
    model.train()
    return {"ce": ce_sum / max(tok_n, 1), "token_acc": tok_ok / max(tok_n, 1), "reasoning_exact": exact / len(indices),
            "ade": float(np.mean(ade)), "ade_cv": float(np.mean(ade_cv)), "n": len(indices)}


# ------------------------------------------------------------------------------------ CLI
def load_samples(spec: str, cache_path: pathlib.Path, cfg, tokenizer, log) -> SampleSet:
    """A .pt sample cache, or a dataset dir (DIR or DIR@REVISION) cached to cache_path on first use."""
    if spec.endswith(".pt"):
        return SampleSet.load(spec)
    path, _, rev = spec.partition("@")
    rev = rev or find_revision(path)
    if cache_path.is_file():
        samples = SampleSet.load(cache_path)
        if samples.meta.get("sources") == [(str(path), rev)]:
            return samples
    log(f"caching windows of {path} ({rev[:8]}) to {cache_path} ...")
    samples = build_samples([(path, rev)], cfg, tokenizer, log=log)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    samples.save(cache_path)
    return samples


def lr_at(step: int, total: int, base: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % of `base`. Progress is the larger of the step
    fraction and `time_fraction` (elapsed / --max-minutes), so a time-limited run still decays."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = max((step - warmup) / max(1, total - warmup), time_fraction)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="training dataset dir (DIR[@REVISION]) or samples .pt")
    ap.add_argument("--heldout", help="held-out dataset dir or samples .pt for periodic evaluation")
    ap.add_argument("--out", required=True, help="checkpoint output dir (config.json + model.safetensors)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--flow-weight", type=float, default=1.0)
    ap.add_argument("--flow-repeats", type=int, default=4, help="noise/t draws per sample per step")
    ap.add_argument("--init", default=None, help="start from this checkpoint dir (default: create_tiny(seed))")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much training time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overfit", action="store_true", help="repeat the first batch (smoke test)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train_log.jsonl", "w")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cfg, tokenizer = load_cfg_and_tokenizer("tiny" if args.init is None else args.init)
    ids = TokenIds.from_tokenizer(tokenizer, cfg.traj_token_start_idx, cfg.traj_vocab_size, cfg.future_traj_bins,
                                  cfg.hist_tokenizer.num_bins, cfg.traj_token_ids or None)
    train = load_samples(args.data, out / "samples_train.pt", cfg, tokenizer, log)
    held = load_samples(args.heldout, out / "samples_heldout.pt", cfg, tokenizer, log) if args.heldout else None
    log(f"{len(train)} training windows" + (f", {len(held)} held-out windows" if held else ""))

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.init is None:
        model = create_tiny(args.seed).to(device)
    else:
        model = load_model(args.init, torch.float32, device)
    model.train()
    batcher = Batcher(train, ids, cfg, device)
    held_batcher = Batcher(held, ids, cfg, device) if held else None
    eval_idx = None
    if held:  # evenly spread over the held-out windows, fixed for the whole run
        eval_idx = np.linspace(0, len(held) - 1, min(args.eval_windows, len(held))).round().astype(int).tolist()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    order_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(len(train), generator=order_gen).tolist()
    cursor = 0
    first_batch = order[:args.batch_size]

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, dynamic_ncols=True)
    history, started, last_eval = [], time.perf_counter(), None
    step = 0
    for step in range(args.steps):
        if args.overfit:
            index = first_batch
        else:
            if cursor + args.batch_size > len(order):
                order = torch.randperm(len(train), generator=order_gen).tolist()
                cursor = 0
            index = order[cursor:cursor + args.batch_size]
            cursor += args.batch_size
        time_fraction = 0.0 if args.max_minutes is None else (time.perf_counter() - started) / (60 * args.max_minutes)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup, time_fraction)
        losses = batch_losses(model, batcher(index), noise_gen, args.flow_repeats)
        loss = losses["ce"] + args.flow_weight * losses["flow"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec = {"step": step + 1, "loss": float(loss.detach()), "ce": float(losses["ce"].detach()),
               "flow": float(losses["flow"].detach()),
               "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"],
               "elapsed_s": round(time.perf_counter() - started, 2)}
        history.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{rec['ce']:.3f}", flow=f"{rec['flow']:.3f}")
        elif (step + 1) % 100 == 0:
            log(f"step {step + 1}: ce {rec['ce']:.4f} flow {rec['flow']:.4f} lr {rec['lr']:.2e} {rec['elapsed_s']:.0f} s")
        done = step + 1 == args.steps
        out_of_time = args.max_minutes is not None and rec["elapsed_s"] > 60 * args.max_minutes
        if held_batcher and ((step + 1) % args.eval_every == 0 or done or out_of_time):
            last_eval = evaluate(model, held_batcher, eval_idx, args.batch_size, args.seed)
            rec["eval"] = last_eval
            log(f"\nstep {step + 1}: held-out " + " ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()
        if out_of_time:
            log(f"\nstopping after {rec['elapsed_s']:.0f} s (--max-minutes {args.max_minutes})")
            break
    if bar is not None:
        bar.close()
    model.eval()
    tok_dir = None if (out / "tokenizer.json").is_file() else (args.init or TINY_DIR)
    save_model(model, out, tokenizer_dir=tok_dir)
    summary = {"steps": step + 1, "final": history[-1], "eval": last_eval, "args": vars(args)}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"saved {out} after {step + 1} steps ({history[-1]['elapsed_s']:.0f} s)")
    return {"history": history, "eval": last_eval, "model": model}


if __name__ == "__main__":
    main()
