"""Qwen3-VL text decoder, written against a StaticKVCache.

Same parameter names as transformers' Qwen3VLTextModel (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, norm), so
checkpoint keys load unchanged. The pieces (RMSNorm, Attention, MLP, DecoderLayer) are shared with
the action expert, which has the same layer structure but other widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .kv_cache import StaticKVCache
from .rope import apply_rotary


class RMSNorm(nn.Module):
    """x / rms(x) * w, normalised in float32 and cast back before the weight (as Qwen3 does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """GQA projections with per-head q/k RMSNorm. Attention itself is done by the caller, which
    knows where keys come from (LM: the cache; expert: cache ‖ own tokens)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, Q, H] -> q [B, heads, Q, D], k, v [B, kv_heads, Q, D]; q and k normed, not rotated."""
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA over rotated q [B, heads, Q, D] and k, v [B, kv_heads, N, D]; mask additive [B|1, 1, Q, N].
        Returns the output projection [B, Q, H]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block. `attention_fn(normed_x) -> [B, Q, H]` supplies the attention part."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, attention_fn) -> torch.Tensor:
        x = x + attention_fn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """The VLM's language model: vlm.model.language_model.* in the checkpoint."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, cache: StaticKVCache, slots: torch.Tensor,
                attn_mask: torch.Tensor | None, n: int, visual_pos_mask: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] | None = None,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run Q tokens written at cache `slots`, attending to cache slots [0, n).

        inputs_embeds [B, Q, H]; slots LongTensor [Q]; attn_mask additive [1|B, 1, Q, n] (None = no
        masking: every query sees all n slots); visual_pos_mask [Q] bool marks image tokens, which
        get deepstack[i] [n_vis, H] added after decoder layer i. Returns (hidden after the final
        norm [B, Q, H], {layer: output of that decoder layer before any deepstack addition}).
        Each layer writes its pre-RoPE K/V at `slots` before attending, so the block sees itself.
        """
        b, q_len, h = inputs_embeds.shape
        self._check_inputs(inputs_embeds, cache, slots, attn_mask, n, visual_pos_mask, deepstack, capture_layers)
        slots = cache.check_slots(slots)  # once per forward: the per-layer writes skip it
        cos, sin = cache.cos_sin(slots)
        if attn_mask is not None:
            attn_mask = attn_mask.to(inputs_embeds.dtype)
        captured: dict[int, torch.Tensor] = {}
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            def attention(normed: torch.Tensor, i: int = i, attn=layer.self_attn) -> torch.Tensor:
                q, k, v = attn.project(normed)
                cache.write(i, slots, k, v, check=False)
                keys = cache.rotated_keys(i, n).expand(b, -1, -1, -1)
                values = cache.values(i, n).expand(b, -1, -1, -1)
                return attn.attend(apply_rotary(q, cos, sin), keys, values, attn_mask)

            x = layer(x, attention)
            if i in capture_layers:
                captured[i] = x
            if deepstack is not None and i < len(deepstack) and visual_pos_mask is not None:
                x = x.clone()
                x[:, visual_pos_mask] = x[:, visual_pos_mask] + deepstack[i].to(x.dtype)
        return self.norm(x), captured

    def _check_inputs(self, x, cache, slots, attn_mask, n, visual_pos_mask, deepstack, capture_layers) -> None:
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be [B, Q, {self.cfg.hidden_size}], got {tuple(x.shape)}")
        b, q_len, _ = x.shape
        if cache.n_layers != self.cfg.num_hidden_layers or cache.head_dim != self.cfg.head_dim \
                or cache.n_kv_heads != self.cfg.num_key_value_heads:
            raise ValueError("cache shape does not match the text config (layers / kv heads / head_dim)")
        if b != cache.batch:
            raise ValueError(f"inputs_embeds batch {b} must equal the cache batch {cache.batch} "
                             "(prefill once with batch 1, then StaticKVCache.repeat_batch(K))")
        if slots.dim() != 1 or slots.numel() != q_len:
            raise ValueError(f"slots must be [Q = {q_len}], got shape {tuple(slots.shape)}")
        if not 0 < n <= cache.max_len:
            raise ValueError(f"n = {n} must be in (0, {cache.max_len}]")
        if attn_mask is not None and (attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, b)
                                      or tuple(attn_mask.shape[1:]) != (1, q_len, n)):
            raise ValueError(f"attn_mask must be [1|{b}, 1, {q_len}, {n}], got {tuple(attn_mask.shape)}")
        if deepstack is not None:
            if visual_pos_mask is None:
                raise ValueError("deepstack features given without visual_pos_mask")
            if visual_pos_mask.shape != (q_len,) or visual_pos_mask.dtype != torch.bool:
                raise ValueError(f"visual_pos_mask must be bool [{q_len}], got {visual_pos_mask.dtype} "
                                 f"{tuple(visual_pos_mask.shape)}")
            if len(deepstack) > len(self.layers):
                raise ValueError(f"{len(deepstack)} deepstack levels for {len(self.layers)} layers")
            n_vis = int(visual_pos_mask.sum())
            for i, feat in enumerate(deepstack):
                if feat.shape != (n_vis, self.cfg.hidden_size):
                    raise ValueError(f"deepstack[{i}] must be [{n_vis}, {self.cfg.hidden_size}] "
                                     f"(n visual positions), got {tuple(feat.shape)}")
        bad = [i for i in capture_layers if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"capture_layers {bad} out of range [0, {len(self.layers)})")
