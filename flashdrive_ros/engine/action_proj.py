"""action_in_proj (noisy action + flow time -> expert tokens) and action_out_proj (alpamayo.md §8).

ActionInProj, per waypoint: Fourier features of acceleration, curvature and the flow time t
(3 x F features, F = 20), an MLP trunk, then LayerNorm. Module names match the checkpoint:

    encoder.trunk = Sequential(Linear(3F, h), SiLU, RMSNorm(h),        # indices 0, 1, 2
                               Linear(h, h), SiLU, RMSNorm(h),         # 3, 4, 5   (per extra layer)
                               Linear(h, out))                         # 6
    norm = LayerNorm(out)

Fourier frequencies are not in the checkpoint: they are a non-persistent buffer.

Public API
----------
fourier_features(x, freqs) -> [..., 2 * len(freqs)]
ActionInProj(out_features, cfg=None, *, hidden_size=512, num_enc_layers=2, num_fourier_feats=20, max_freq=100.0)
    cfg: any object with hidden_size / num_enc_layers / num_fourier_feats / max_freq
    (config.ActionInProjConfig); its values override the keyword defaults.
    forward(noisy_action [K, W, 2], t [K] | [K, 1] | scalar) -> [K, W, out_features]
make_action_out_proj(expert_hidden) -> nn.Linear(expert_hidden, 2)   (keys weight, bias)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 whatever the weight dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def fourier_features(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """sqrt(2) * [sin(2 pi x f), cos(2 pi x f)] over the last axis -> [..., 2 * n_freqs]."""
    angles = 2 * math.pi * x.unsqueeze(-1) * freqs
    return math.sqrt(2) * torch.cat([angles.sin(), angles.cos()], dim=-1)


class _Encoder(nn.Module):
    """Holds the trunk so that parameter names read `encoder.trunk.N`."""

    def __init__(self, in_features: int, hidden: int, out_features: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU(), RMSNorm(hidden, eps=1e-5)]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.trunk = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class ActionInProj(nn.Module):
    """Per-waypoint embedding of the noisy normalized action and the flow time."""

    def __init__(self, out_features: int, cfg=None, *, hidden_size: int = 512, num_enc_layers: int = 2,
                 num_fourier_feats: int = 20, max_freq: float = 100.0):
        super().__init__()
        if cfg is not None:
            hidden_size = cfg.hidden_size
            num_enc_layers = cfg.num_enc_layers
            num_fourier_feats = cfg.num_fourier_feats
            max_freq = cfg.max_freq
        if num_fourier_feats <= 0 or num_fourier_feats % 2:
            raise ValueError(f"num_fourier_feats must be positive and even, got {num_fourier_feats}")
        if num_enc_layers < 1:
            raise ValueError(f"num_enc_layers must be >= 1, got {num_enc_layers}")
        if max_freq <= 0:
            raise ValueError(f"max_freq must be positive, got {max_freq}")
        self.num_fourier_feats = num_fourier_feats
        freqs = torch.logspace(0, math.log10(max_freq), num_fourier_feats // 2, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        self.encoder = _Encoder(3 * num_fourier_feats, hidden_size, out_features, num_enc_layers)
        self.norm = nn.LayerNorm(out_features)

    def features(self, noisy_action: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The 3F trunk inputs [K, W, 3F]: Fourier(accel) ‖ Fourier(curvature) ‖ Fourier(t)."""
        if noisy_action.dim() != 3 or noisy_action.shape[-1] != 2:
            raise ValueError(f"noisy_action must be [K, W, 2], got shape {tuple(noisy_action.shape)}")
        k, w, _ = noisy_action.shape
        x = noisy_action.float()
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() == 0:
            t = t.expand(k)
        if t.shape != (k,):
            raise ValueError(f"t must be a scalar, [K] or [K, 1] with K={k}, got shape {tuple(t.shape)}")
        t = t.view(k, 1).expand(k, w)
        freqs = self.freqs.to(x.device)
        return torch.cat([fourier_features(x[..., 0], freqs), fourier_features(x[..., 1], freqs),
                          fourier_features(t, freqs)], dim=-1)

    def forward(self, noisy_action: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        feats = self.features(noisy_action, t)
        dtype = self.norm.weight.dtype
        return self.norm(self.encoder(feats.to(dtype)))


def make_action_out_proj(expert_hidden: int) -> nn.Linear:
    """Expert hidden -> velocity of (accel, curvature): a plain Linear with bias."""
    return nn.Linear(expert_hidden, 2)
