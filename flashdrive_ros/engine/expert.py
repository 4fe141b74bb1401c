"""Action expert: a Qwen3-VL text decoder without embeddings that reads the LM's KV cache.

Config = the text config with `expert_cfg` overrides (own hidden / MLP / q heads; same layer
count, KV heads and head_dim as the LM). In layer i the 64 action tokens compute their own q/k/v
(q/k norm, M-RoPE) and attend jointly over [rotated LM cache keys of slots [0, n_ctx) ‖ their own
64 keys], non-causally among themselves (alpamayo.md §7). The cache is only read.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig
from .kv_cache import StaticKVCache
from .rope import apply_rotary, mrope_cos_sin
from .text_model import DecoderLayer, RMSNorm


class Expert(nn.Module):
    """expert.layers.N.*, expert.norm.weight in the checkpoint."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, action_embeds: torch.Tensor, cache: StaticKVCache, n_ctx: int | torch.Tensor,
                action_positions: torch.Tensor) -> torch.Tensor:
        """action_embeds [K, T, He]; cache slots [0, n_ctx) are visible (up to and including
        `<|traj_future_start|>`); action_positions [3, T] (or [K, 3, T] per sample).

        n_ctx may be an int (all samples) or a LongTensor [K] (samples whose reasoning stopped at
        different lengths). The cache batch must be 1 (shared) or K. Returns hidden [K, T, He]
        after the final norm.
        """
        k_samples, t_len, _ = action_embeds.shape
        n_ctx_t, n_max = self._check(action_embeds, cache, n_ctx, action_positions)
        cos, sin = mrope_cos_sin(action_positions.reshape(-1, 3, t_len).transpose(0, 1).reshape(3, -1),
                                 self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section)
        # [1|K, 1, T, D] so that per-sample positions broadcast over heads.
        cos = cos.view(-1, 1, t_len, self.cfg.head_dim)
        sin = sin.view(-1, 1, t_len, self.cfg.head_dim)

        # Context slots beyond a sample's n_ctx are masked; its own T tokens are always visible.
        visible = torch.arange(n_max, device=cache.device)[None, :] < n_ctx_t[:, None]  # [K|1, n_max]
        mask = None
        if not bool(visible.all()):
            ctx = torch.zeros(visible.shape, dtype=action_embeds.dtype, device=cache.device)
            ctx.masked_fill_(~visible, torch.finfo(action_embeds.dtype).min)
            own = ctx.new_zeros(ctx.shape[0], t_len)
            mask = torch.cat([ctx, own], dim=1)[:, None, None, :]  # [K|1, 1, 1, n_max + T]

        x = action_embeds
        for i, layer in enumerate(self.layers):
            def attention(normed: torch.Tensor, i: int = i, attn=layer.self_attn) -> torch.Tensor:
                q, k, v = attn.project(normed)
                keys = torch.cat([cache.rotated_keys(i, n_max).expand(k_samples, -1, -1, -1),
                                  apply_rotary(k, cos, sin)], dim=2)
                values = torch.cat([cache.values(i, n_max).expand(k_samples, -1, -1, -1), v], dim=2)
                return attn.attend(apply_rotary(q, cos, sin), keys, values, mask)

            x = layer(x, attention)
        return self.norm(x)

    def _check(self, x, cache, n_ctx, positions) -> tuple[torch.Tensor, int]:
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"action_embeds must be [K, T, {self.cfg.hidden_size}], got {tuple(x.shape)}")
        k_samples, t_len, _ = x.shape
        if cache.n_layers != self.cfg.num_hidden_layers or cache.n_kv_heads != self.cfg.num_key_value_heads \
                or cache.head_dim != self.cfg.head_dim:
            raise ValueError("cache shape does not match the expert (layers / kv heads / head_dim)")
        if cache.batch not in (1, k_samples):
            raise ValueError(f"cache batch {cache.batch} must be 1 or K = {k_samples}")
        if positions.shape not in ((3, t_len), (k_samples, 3, t_len)):
            raise ValueError(f"action_positions must be [3, {t_len}] or [{k_samples}, 3, {t_len}], "
                             f"got {tuple(positions.shape)}")
        n_ctx_t = torch.as_tensor(n_ctx, dtype=torch.long, device=cache.device).reshape(-1)
        if n_ctx_t.numel() not in (1, k_samples):
            raise ValueError(f"n_ctx must be an int or have K = {k_samples} entries, got {n_ctx_t.numel()}")
        n_max = int(n_ctx_t.max())
        if int(n_ctx_t.min()) < 1 or n_max > cache.max_len:
            raise ValueError(f"n_ctx must be in [1, {cache.max_len}], got {n_ctx_t.tolist()}")
        return n_ctx_t, n_max
