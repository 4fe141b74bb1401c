"""The fast path stated with `key_limit` against the engine's eager modules, on the tiny config.

Imported by test_graphs_fusion.py (PyTorch fallback path: key_limit becomes an additive mask) and run
as a script under Triton's interpreter by test_kernel_path.py (the Triton kernel path:
cache_kernels.qk_norm_rope_store + attention_kernel.slot_attention + cache_kernels.shift_slots):

    TRITON_INTERPRET=1 python test/kernel_path_check.py     # prints one JSON line of relative errors
"""

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdrive_ros.engine import graphs  # noqa: E402
from flashdrive_ros.engine.cache_kernels import shift_waves  # noqa: E402
from flashdrive_ros.engine.config import tiny_config  # noqa: E402
from flashdrive_ros.engine.expert import Expert  # noqa: E402
from flashdrive_ros.engine.kv_cache import StaticKVCache  # noqa: E402
from flashdrive_ros.engine.rope import extend_positions, rope_index  # noqa: E402
from flashdrive_ros.engine.streaming import causal_mask  # noqa: E402
from flashdrive_ros.engine.text_model import TextModel  # noqa: E402
from flashdrive_ros.engine.vision import build_vision_tower, encode_images  # noqa: E402


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(noise + 1.0 if "norm" in name and p.dim() == 1 else noise)


def _cache(cfg, max_len: int, seed: int, dtype: torch.dtype = torch.float32) -> StaticKVCache:
    ids = torch.zeros(max_len - 30, dtype=torch.long)
    ids[5:13] = 7
    ids[20:28] = 7
    pos, _ = rope_index(ids, torch.tensor([[1, 4, 8], [1, 4, 8]]), 7, 2)
    pos = extend_positions(pos, max_len)
    c = StaticKVCache.for_config(cfg.text, 1, max_len, pos, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    c.k.copy_(torch.randn(c.k.shape, generator=g))  # stale garbage: must be masked, never read
    c.v.copy_(torch.randn(c.v.shape, generator=g))
    c.set_positions(pos)
    return c


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@torch.no_grad()
def run() -> dict[str, float]:
    """Max relative error of every fast-path stage (stated with key_limit) against the eager modules."""
    torch.manual_seed(0)
    cfg = tiny_config()
    lm, ex = TextModel(cfg.text).eval(), Expert(cfg.expert_text_config()).eval()
    _randomize(lm, 1)
    _randomize(ex, 2)
    fast_lm, fast_ex = copy.deepcopy(lm), copy.deepcopy(ex)
    graphs.fuse_projections(fast_lm)
    graphs.fuse_projections(fast_ex)
    H, T = cfg.text.hidden_size, cfg.action_space.n_waypoints
    max_len = 144
    c_ref, c_fast = _cache(cfg, max_len, 3), _cache(cfg, max_len, 3)
    err: dict[str, float] = {}

    # prefill 50 tokens (deepstack on 16 image rows), keys [0, 64): slots >= 50 hold garbage
    slots = torch.arange(50)
    vis = torch.zeros(50, dtype=torch.bool)
    vis[5:13] = True
    vis[20:28] = True
    deep = [torch.randn(16, H) for _ in range(3)]
    x = torch.randn(1, 50, H)
    ref, cap_ref = lm(x, c_ref, slots, causal_mask(slots, 50), 50, vis, deep, capture_layers=(1, 3))
    out, cap = graphs.lm_forward(fast_lm, x, c_fast, slots, None, 64, vis.nonzero().flatten(), deep,
                                 capture_layers=(1, 3), key_limit=slots + 1)
    err["prefill"] = _rel(out, ref)
    err["prefill_captured"] = max(_rel(cap[i], cap_ref[i]) for i in (1, 3))
    err["cache_after_prefill"] = max(_rel(getattr(c_fast, t)[:, :, :, :50], getattr(c_ref, t)[:, :, :, :50])
                                     for t in ("k", "v", "k_rot"))

    # streaming re-prefill: rows 30..49 again (scattered limits: each sees keys <= its slot and < 50)
    q_slots = torch.tensor([30, 31, 32, 40, 41, 42, 43, 47, 48, 49])
    xq = torch.randn(1, q_slots.numel(), H)
    ref, _ = lm(xq, c_ref, q_slots, causal_mask(q_slots, 50), 50)
    out, _ = graphs.lm_forward(fast_lm, xq, c_fast, q_slots, None, 64, key_limit=(q_slots + 1).clamp(max=50))
    err["streaming_prefill"] = _rel(out, ref)

    # decode 4 tokens over all max_len slots (garbage beyond the current one)
    for cur in range(50, 54):
        t = torch.randn(1, 1, H)
        s = torch.tensor([cur])
        ref, _ = lm(t, c_ref, s, None, cur + 1)
        out, _ = graphs.lm_forward(fast_lm, t, c_fast, s, None, max_len, key_limit=s + 1)
        err[f"decode_{cur}"] = _rel(out, ref)

    # verify block of 8, causal within the block
    s = torch.arange(54, 62)
    t = torch.randn(1, 8, H)
    ref, _ = lm(t, c_ref, s, causal_mask(s, 62), 62)
    out, _ = graphs.lm_forward(fast_lm, t, c_fast, s, None, max_len, key_limit=s + 1)
    err["verify"] = _rel(out, ref)

    # action: T tokens right after n_ctx = 62, non-causal among themselves
    n_ctx = 62
    emb = torch.randn(1, T, cfg.expert.hidden_size)
    act = torch.arange(n_ctx, n_ctx + T)
    ref = ex(emb, c_ref, n_ctx, c_ref.positions[:, act])
    out = graphs.expert_forward(fast_ex, emb, c_fast, act, None, max_len, key_limit=torch.tensor(n_ctx + T))
    err["action"] = _rel(out, ref)

    # streaming slot shift with overlapping sources and destinations
    src, dst = torch.tensor([10, 11, 12, 20, 21]), torch.tensor([5, 6, 10, 11, 12])
    c_ref.shift(src, dst)
    graphs.cache_shift(c_fast, src, dst)
    err["shift"] = max(_rel(getattr(c_fast, t)[:, :, :, :62], getattr(c_ref, t)[:, :, :, :62])
                       for t in ("k", "v", "k_rot"))
    # the streaming shift by one frame (4 frames of 6 slots at 24..47: frames 1..3 onto 0..2) moved in
    # place in the wave order the engine computes (3 waves: each frame is read before it is overwritten)
    src, dst = torch.arange(30, 48), torch.arange(24, 42)
    s_w, d_w, waves = shift_waves(src, dst)
    assert len(waves) == 3, waves
    c_ref.shift(src, dst)
    graphs.cache_shift(c_fast, s_w, d_w, waves)
    err["shift_waves"] = max(_rel(getattr(c_fast, t)[:, :, :, :62], getattr(c_ref, t)[:, :, :, :62])
                             for t in ("k", "v", "k_rot"))

    # vision tower with head dim 24 (no power of two, like the real 72): per-image attention through
    # slot_attention's padded lanes (graphs.VISION_FAST, off by default), against transformers' tower
    vcfg = dataclasses.replace(cfg.vision, hidden_size=48, num_heads=2, intermediate_size=96)
    tower = build_vision_tower(vcfg).eval()
    _randomize(tower, 4)
    grid = torch.tensor([[1, 4, 6]] * 2)
    pix = torch.randn(2 * 4 * 6, 3 * 2 * 16 * 16)
    ref = encode_images(tower, pix, grid)
    graphs.VISION_FAST["attention_kernel"] = True  # the optional kernel path (off by default on CUDA)
    try:
        emb, deep = graphs.vision_forward(tower, pix, graphs.vision_static(tower, grid))
    finally:
        graphs.VISION_FAST["attention_kernel"] = False
    err["vision"] = max([_rel(emb, ref.embeds)] + [_rel(a, b) for a, b in zip(deep, ref.deepstack)])
    err["kernels"] = float(graphs.kernels_usable(x))
    return err


if __name__ == "__main__":
    print(json.dumps(run()))
