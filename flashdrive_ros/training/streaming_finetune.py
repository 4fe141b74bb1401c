"""Streaming fine-tuning of the action expert (flashdrive.md §3).

    python -m flashdrive_ros.training.streaming_finetune --init CKPT --data DIR|PT --out DIR --steps N --seed S

The VLM is frozen; only `expert`, `action_in_proj` and `action_out_proj` train. Each sample is a run
of consecutive 10 Hz windows of one clip, rolled out through DriveEngine's own streaming pipeline
without gradients:
  window 0      full prefill of all 16 frames (freezes the streaming layout), then the frame shift;
  windows 1..L-1  streaming prefill (4 new frames + tail under the streaming mask), then the shift;
  last window   streaming prefill + reasoning decode (the engine's decode loop),
so the KV cache the expert reads is the model's own streaming approximation ("rollout-based teacher
forcing"). The loss is flow matching on the last window's ground-truth actions through the expert
over that cache (slots up to <|traj_future_start|>), as in train.py. L is drawn uniformly from
[--min-rollout, --max-rollout] (4..16) once per optimizer step. Nothing here is tiny-specific: with
--init pointing at a real checkpoint and a sample cache built with `dataset.py --model CKPT` it runs
the same code on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch

from flashdrive_ros.engine.action_space import UnicycleActionSpace
from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.flow import FlowSchedule, sample as flow_sample
from flashdrive_ros.engine.history import encode_history
from flashdrive_ros.engine.loader import resolve_dtype, save_model
from flashdrive_ros.engine.preprocess import preprocess_images, tokens_per_image

from .dataset import SampleSet
from .train import N_WAYPOINTS, flow_matching_loss, load_samples

TRAINABLE = ("expert.", "action_in_proj.", "action_out_proj.")


def trainable_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(TRAINABLE)]


def freeze_vlm(model) -> list[torch.nn.Parameter]:
    """requires_grad only on the expert and the action projections; returns those parameters."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE))
        if p.requires_grad:
            params.append(p)
    return params


@torch.no_grad()
def prefill_window(engine: DriveEngine, frames: np.ndarray, hist_xyz: np.ndarray, stream: bool):
    """The preprocess / encode / prefill part of DriveEngine.step for one window.

    stream=False: full prefill (window 0 of a rollout); True: streaming prefill of the newest frame
    of each view + the tail. Returns (logits of the last prompt token [1, V], PromptLayout)."""
    cfg, model = engine.cfg, engine.model
    h, w = frames.shape[2:4]
    n_tok = tokens_per_image(h, w, cfg.min_pixels, cfg.max_pixels, cfg.vision.patch_size,
                             cfg.vision.spatial_merge_size)
    history_ids = encode_history(torch.from_numpy(np.asarray(hist_xyz, dtype=np.float64)).float(),
                                 engine.ids.history_start, **engine._hist_kwargs)
    ids, playout = engine._prompt(n_tok, history_ids)
    images = frames[:, -1] if stream else frames.reshape(-1, *frames.shape[2:])
    pixels, grid = preprocess_images(images, cfg.min_pixels, cfg.max_pixels, cfg.vision.patch_size,
                                     cfg.vision.temporal_patch_size, cfg.vision.spatial_merge_size,
                                     device=engine.device, dtype=engine.dtype)
    feats = model.encode_images(pixels, grid.to(engine.device))
    ids = ids.to(engine.device)
    if stream:
        hidden = engine._streaming_prefill(ids, feats)
    else:
        hidden = engine._full_prefill(ids, playout, feats, grid)
    return model.logits(hidden), playout


@torch.no_grad()
def rollout(engine: DriveEngine, samples: SampleSet, run: list[int], generator: torch.Generator) -> int:
    """Stream the windows `run` (consecutive, one clip) through the engine without gradients; the last
    window is decoded. Returns n_ctx (cache slots the expert may read) for the last window."""
    engine.reset()
    for k, i in enumerate(run):
        frames = samples.window_frames(i)
        logits, playout = prefill_window(engine, frames, samples.hist_xyz[i].numpy(), stream=k > 0)
        if k == len(run) - 1:
            _, _, _, n_ctx = engine._decode(logits, playout.length, generator)
            return n_ctx
        engine.shift(1)  # frames 1..3 -> 0..2 for the next window
        engine._last_t0 = int(samples.t0_us[i])
    raise ValueError("empty rollout")


def choose_runs(runs: list[list[int]], n: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """n random windows runs of `length` consecutive windows (uniform over start positions)."""
    starts = [(r, s) for r in range(len(runs)) for s in range(len(runs[r]) - length + 1)]
    if not starts:
        raise ValueError(f"no run of {length} consecutive windows in the data")
    pick = torch.randint(len(starts), (n,), generator=generator).tolist()
    return [runs[starts[p][0]][starts[p][1]:starts[p][1] + length] for p in pick]


@torch.no_grad()
def evaluate_streaming(engine: DriveEngine, samples: SampleSet, runs: list[list[int]], seed: int = 0) -> dict:
    """ADE@6.4s of 10-step flow (one noise draw) on the last window of fixed held-out rollouts."""
    model = engine.model
    model.eval()
    space = UnicycleActionSpace(model.cfg.action_space)
    gen = torch.Generator().manual_seed(seed)
    ades = []
    for run in runs:
        n_ctx = rollout(engine, samples, run, gen)
        i = run[-1]
        start = int(engine.cache.positions[:, n_ctx - 1].max()) + 1
        pos = torch.arange(start, start + N_WAYPOINTS, device=engine.device).expand(3, -1)

        def velocity(x, t):
            return model.action_velocity(model.expert(model.action_in_proj(x, t), engine.cache, n_ctx, pos))

        noise = torch.randn((1, N_WAYPOINTS, 2), generator=gen).to(engine.device, engine.dtype)
        act = flow_sample(velocity, noise, FlowSchedule.uniform(10)).double().cpu()
        traj = space.action_to_trajectory(act, samples.hist_xyz[i], samples.hist_rot[i])
        ades.append(float((traj.xyz[0, :, :2] - samples.fut_xyz[i, :, :2]).norm(dim=-1).mean()))
    return {"ade": float(np.mean(ades)), "n": len(ades)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="checkpoint to fine-tune ('tiny' or a dir)")
    ap.add_argument("--data", required=True, help="training dataset dir (DIR[@REVISION]) or samples .pt")
    ap.add_argument("--heldout", help="held-out dataset dir or samples .pt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4, help="rollouts per optimizer step")
    ap.add_argument("--flow-repeats", type=int, default=8, help="noise/t draws per rollout")
    ap.add_argument("--min-rollout", type=int, default=4)
    ap.add_argument("--max-rollout", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.0, help="reasoning decode of the last window")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="reasoning budget of the last window")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-rollouts", type=int, default=24)
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    engine = DriveEngine.from_pretrained(args.init, device=args.device, dtype=resolve_dtype(args.dtype),
                                         streaming=True, temperature=args.temperature, seed=args.seed,
                                         max_new_tokens=args.max_new_tokens)
    model = engine.model
    train = load_samples(args.data, out / "samples_train.pt", engine.cfg, engine.tokenizer, log)
    held = load_samples(args.heldout, out / "samples_heldout.pt", engine.cfg, engine.tokenizer, log) \
        if args.heldout else None
    runs = train.runs(args.max_rollout)
    if not runs:
        raise SystemExit(f"no clip has {args.max_rollout} consecutive windows")
    params = freeze_vlm(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_runs = None
    if held:
        hruns = held.runs(args.max_rollout)
        eval_runs = choose_runs(hruns, args.eval_rollouts, (args.min_rollout + args.max_rollout) // 2 + 1,
                                torch.Generator().manual_seed(1234))
    log(f"{len(train)} windows in {len(runs)} runs; trainable: {sum(p.numel() for p in params)} parameters")

    history, started = [], time.perf_counter()
    if eval_runs:
        ev = evaluate_streaming(engine, held, eval_runs, args.seed)
        history.append({"step": 0, "eval": ev})
        log(f"step 0: held-out streaming ADE {ev['ade']:.4f} (n={ev['n']})")
    step = 0
    for step in range(args.steps):
        length = int(torch.randint(args.min_rollout, args.max_rollout + 1, (1,), generator=gen))
        batch_runs = choose_runs(runs, args.batch_size, length + 1, gen)  # L rolled out + the trained one
        frac = max(step / args.steps, 0.0 if args.max_minutes is None
                   else (time.perf_counter() - started) / (60 * args.max_minutes))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for run in batch_runs:
            n_ctx = rollout(engine, train, run, gen)
            model.train()
            actions = train.action[run[-1]][None].to(engine.device, engine.dtype)
            loss = flow_matching_loss(model, engine.cache, torch.tensor([n_ctx], device=engine.device), actions,
                                      noise_gen, args.flow_repeats) / len(batch_runs)
            loss.backward()
            model.eval()
            total += float(loss.detach())
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step + 1, "flow": total, "rollout": length, "lr": lr, "grad_norm": float(gnorm),
               "elapsed_s": round(time.perf_counter() - started, 2)}
        out_of_time = args.max_minutes is not None and rec["elapsed_s"] > 60 * args.max_minutes
        if (step + 1) % 10 == 0:
            log(f"step {step + 1}: flow {total:.4f} L={length} lr {lr:.2e} {rec['elapsed_s']:.0f} s")
        if eval_runs and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps or out_of_time):
            rec["eval"] = evaluate_streaming(engine, held, eval_runs, args.seed)
            log(f"step {step + 1}: held-out streaming ADE {rec['eval']['ade']:.4f}")
        history.append(rec)
        if out_of_time:
            break
    for p in model.parameters():
        p.requires_grad_(False)
    save_model(model.float() if engine.dtype != torch.float32 else model, out,
               tokenizer_dir=None if (out / "tokenizer.json").is_file() else _tokenizer_dir(args.init))
    with open(out / "finetune_log.jsonl", "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    log(f"saved {out} after {step + 1} steps")
    return {"history": history, "model": model}


def _tokenizer_dir(init: str) -> pathlib.Path:
    from flashdrive_ros.engine.loader import TINY_DIR
    return TINY_DIR if init == "tiny" else pathlib.Path(init)


if __name__ == "__main__":
    main()
