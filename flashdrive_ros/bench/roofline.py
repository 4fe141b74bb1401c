"""Roofline floor per stage: FLOPs and the fewest bytes each stage must move, from the config and shape.

floor = max(FLOPs / peak_flops, bytes / peak_bw). Bytes = every weight read once + KV cache read
once + KV written once (activations that could stay on chip are not counted); FLOPs = 2 per
multiply-add of every matmul, attention included (causal rows count only the keys they see).
Defaults are the H100 ceilings measured on the device (KINDS.md): 790 TFLOP/s bf16, 3.0 TB/s.

    python -m flashdrive_ros.bench.roofline --shape full [--bench-json DIR/bench.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from ..engine.config import AlpamayoConfig, TextConfig
from .shapes import ADAPTIVE_EVALS, DRAFT_BLOCK, FLOW_STEPS, Shape, get_shape

PEAK_FLOPS = 790e12
PEAK_BW = 3.0e12
BYTES = 2  # bf16


def text_layer_params(t: TextConfig) -> int:
    """Matmul parameters of one decoder layer (norm weights are negligible and not matmuls)."""
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size


def vision_params(cfg: AlpamayoConfig) -> dict[str, int]:
    v = cfg.vision
    h, m = v.hidden_size, v.hidden_size * v.spatial_merge_size ** 2
    block = 4 * h * h + 2 * h * v.intermediate_size
    merger = m * m + m * v.out_hidden_size
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * h
    return {"block": block, "blocks": v.depth * block, "merger": merger,
            "mergers": (1 + len(v.deepstack_visual_indexes)) * merger, "patch": patch,
            "total": v.depth * block + (1 + len(v.deepstack_visual_indexes)) * merger + patch}


@dataclass
class StageCost:
    name: str
    flops: float
    bytes: float
    note: str = ""

    def floor_ms(self, peak_flops: float = PEAK_FLOPS, peak_bw: float = PEAK_BW) -> float:
        return 1e3 * max(self.flops / peak_flops, self.bytes / peak_bw)

    def bound(self, peak_flops: float = PEAK_FLOPS, peak_bw: float = PEAK_BW) -> str:
        return "compute" if self.flops / peak_flops >= self.bytes / peak_bw else "memory"


def _kv_bytes_per_slot(t: TextConfig) -> int:
    return t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * BYTES


def encode_cost(shape: Shape, n_images: int) -> StageCost:
    cfg, v = shape.cfg, shape.cfg.vision
    p = vision_params(cfg)
    n = n_images * shape.patches_per_image
    lin = 2 * n * (p["patch"] + p["blocks"]) + 2 * (n // v.spatial_merge_size ** 2) * p["mergers"]
    attn = v.depth * n_images * 4 * shape.patches_per_image ** 2 * v.hidden_size  # per-image full attention
    byt = p["total"] * BYTES + n * shape.patch_dim * BYTES
    return StageCost("encode", lin + attn, byt, f"{n_images} images, {n} patches")


def lm_pass_cost(t: TextConfig, q_slots: list[int], n_keys_read: int, logits_rows: int, vocab: int,
                 name: str, note: str) -> StageCost:
    """One LM forward of the query rows at `q_slots` (causal: row at slot s sees s + 1 keys)."""
    lp = text_layer_params(t)
    q = len(q_slots)
    lin = 2 * q * lp * t.num_hidden_layers + 2 * logits_rows * t.hidden_size * vocab
    seen = sum(s + 1 for s in q_slots)
    attn = 4 * seen * t.num_attention_heads * t.head_dim * t.num_hidden_layers
    byt = (lp * t.num_hidden_layers + (t.hidden_size * vocab if logits_rows else 0)) * BYTES \
        + n_keys_read * _kv_bytes_per_slot(t) + q * _kv_bytes_per_slot(t)
    return StageCost(name, lin + attn, byt, note)


def prefill_cost(shape: Shape, streaming: bool) -> StageCost:
    t, L = shape.cfg.text, shape.prompt_len
    if streaming:
        # query = new frame block of every view (the last frame of view v) + tail
        starts = []
        off = shape.prefix_len
        for v in range(shape.n_views):
            off += shape.view_label_len
            for f in range(shape.n_frames):
                off += shape.frame_label_len
                if f == shape.n_frames - 1:
                    starts += list(range(off, off + shape.block_len))
                off += shape.block_len
        starts += list(range(L - shape.tail_len, L))
        c = lm_pass_cost(t, starts, L, 1, t.vocab_size, "prefill", f"streaming: {len(starts)} query tokens over {L} keys")
        # + the slot shift: read and write K/V of 3 frames per view
        moved = shape.n_views * (shape.n_frames - 1) * shape.block_len
        c.bytes += 2 * moved * _kv_bytes_per_slot(t)
        return c
    return lm_pass_cost(t, list(range(L)), L, 1, t.vocab_size, "prefill", f"full: {L} tokens")


def decode_cost(shape: Shape, tau: float | None) -> StageCost:
    t, L, n = shape.cfg.text, shape.prompt_len, shape.decode_tokens
    if tau is None:
        passes = [lm_pass_cost(t, [L + i], L + i + 1, 1, t.vocab_size, "", "") for i in range(n)]
        note = f"{n} passes of q=1"
    else:
        n_pass = math.ceil(n / tau - 1e-9)
        passes = [lm_pass_cost(t, list(range(L + i * n // n_pass, L + i * n // n_pass + DRAFT_BLOCK)),
                               L + (i + 1) * n // n_pass + DRAFT_BLOCK, DRAFT_BLOCK, t.vocab_size, "", "")
                  for i in range(n_pass)]
        note = f"{n_pass} verify passes of q={DRAFT_BLOCK} (τ={tau:g}; drafter not counted)"
    return StageCost("decode", sum(p.flops for p in passes), sum(p.bytes for p in passes), note)


def action_cost(shape: Shape, evals: int) -> StageCost:
    cfg = shape.cfg
    te = cfg.expert_text_config()
    n_act = cfg.action_space.n_waypoints
    n_ctx = shape.prompt_len + shape.decode_tokens
    lp = text_layer_params(te)
    lin = 2 * n_act * lp * te.num_hidden_layers
    attn = 4 * n_act * (n_ctx + n_act) * te.num_attention_heads * te.head_dim * te.num_hidden_layers
    byt = lp * te.num_hidden_layers * BYTES + n_ctx * _kv_bytes_per_slot(cfg.text)
    return StageCost("action", evals * (lin + attn), evals * byt, f"{evals} expert evaluations, 64 tokens over {n_ctx} keys")


def stage_costs(shape: Shape, streaming: bool, tau: float | None, evals: int) -> list[StageCost]:
    return [encode_cost(shape, shape.n_views if streaming else shape.n_images), prefill_cost(shape, streaming),
            decode_cost(shape, tau), action_cost(shape, evals)]


CONFIGS = {
    "baseline": dict(streaming=False, tau=None, evals=FLOW_STEPS),
    "all (streaming + τ=5.6 + adaptive)": dict(streaming=True, tau=5.6, evals=ADAPTIVE_EVALS),
}


def floors(shape: Shape, peak_flops: float = PEAK_FLOPS, peak_bw: float = PEAK_BW) -> dict:
    out = {}
    for label, kw in CONFIGS.items():
        rows = []
        for c in stage_costs(shape, **kw):
            rows.append({"stage": c.name, "gflop": c.flops / 1e9, "gbyte": c.bytes / 1e9,
                         "floor_ms": c.floor_ms(peak_flops, peak_bw), "bound": c.bound(peak_flops, peak_bw),
                         "note": c.note})
        out[label] = {"stages": rows, "total_floor_ms": sum(r["floor_ms"] for r in rows)}
    return out


def markdown(shape: Shape, fl: dict, measured: dict | None = None) -> str:
    lines = []
    for label, d in fl.items():
        meas = (measured or {}).get(label, {})
        lines.append(f"\n**{label}** ({shape.name} shape)\n")
        lines.append("| stage | GFLOP | GB moved | bound | floor ms | measured ms (median) | measured / floor | work |")
        lines.append("|---|---:|---:|---|---:|---:|---:|---|")
        for r in d["stages"]:
            m = meas.get(r["stage"])
            ms = f"{m:.2f}" if m is not None else "–"
            ratio = f"{m / r['floor_ms']:.2f}×" if m is not None and r["floor_ms"] > 0 else "–"
            lines.append(f"| {r['stage']} | {r['gflop']:.1f} | {r['gbyte']:.2f} | {r['bound']} | {r['floor_ms']:.2f} "
                         f"| {ms} | {ratio} | {r['note']} |")
        m = meas.get("total")
        tot = d["total_floor_ms"]
        ms = f"{m:.2f}" if m is not None else "–"
        ratio = f"{m / tot:.2f}×" if m is not None else "–"
        lines.append(f"| **total** | | | | **{tot:.2f}** | {ms} | {ratio} | |")
    return "\n".join(lines) + "\n"


def measured_from_bench(bench: dict) -> dict:
    """Map the benchmark rows onto the roofline configurations (median ms per stage)."""
    want = {"baseline": "ours: graphs+fusion", "all (streaming + τ=5.6 + adaptive)": "ours: all (τ=5.6)"}
    out = {}
    for label, row_name in want.items():
        for row in bench.get("rows", []):
            if row["name"] == row_name:
                out[label] = {k: v["median"] for k, v in row["stats"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="full")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_FLOPS / 1e12)
    ap.add_argument("--peak-tbps", type=float, default=PEAK_BW / 1e12)
    ap.add_argument("--bench-json", help="bench.json of a benchmark run: adds the measured column")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = ap.parse_args(argv)
    shape = get_shape(args.shape)
    fl = floors(shape, args.peak_tflops * 1e12, args.peak_tbps * 1e12)
    measured = None
    if args.bench_json:
        with open(args.bench_json) as f:
            measured = measured_from_bench(json.load(f))
    if args.json:
        print(json.dumps(fl, indent=1))
    else:
        print(f"Roofline floors at {args.peak_tflops:g} TFLOP/s and {args.peak_tbps:g} TB/s "
              f"(prompt {shape.prompt_len} tokens, {shape.decode_tokens} decoded tokens)")
        print(markdown(shape, fl, measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
