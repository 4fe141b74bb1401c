"""Ego-history delta tokenizer: 16 past poses -> 48 discrete history token ids (alpamayo.md §5).

Positions (ego frame at t0, last pose = origin) get a zero row prepended and are differenced into
16 per-step deltas (dx, dy, dz). Each delta component is binned uniformly over [min, max] with
`num_bins` bins (values outside are clamped), flattened step-major as (dx, dy, dz) and offset by the
id of history bin 0 (`TokenIds.history_start`, = traj_token_start_idx + 3000).
Rotations are not tokenized.

Public API
----------
encode_history(xyz [..., T, 3], history_start_id, num_bins=1000, xyz_min=(-4,-4,-10), xyz_max=(4,4,10))
    -> LongTensor [..., 3T]
decode_history(ids [..., 3T], history_start_id, ...) -> xyz [..., T, 3]  (bin centres; for tests/debug)
history_kwargs(hist_cfg) -> dict of num_bins/xyz_min/xyz_max from a config.HistoryTokenizerConfig
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DEFAULT_MIN = (-4.0, -4.0, -10.0)
DEFAULT_MAX = (4.0, 4.0, 10.0)


def history_kwargs(hist_cfg) -> dict:
    """Keyword arguments for encode/decode from a config object with num_bins/ego_xyz_min/ego_xyz_max."""
    return dict(num_bins=hist_cfg.num_bins, xyz_min=tuple(hist_cfg.ego_xyz_min), xyz_max=tuple(hist_cfg.ego_xyz_max))


def _bounds(xyz_min, xyz_max, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.as_tensor(xyz_min, dtype=torch.float32, device=like.device)
    hi = torch.as_tensor(xyz_max, dtype=torch.float32, device=like.device)
    if lo.shape != (3,) or hi.shape != (3,):
        raise ValueError(f"xyz_min / xyz_max must have 3 values, got {tuple(lo.shape)} / {tuple(hi.shape)}")
    if not bool((hi > lo).all()):
        raise ValueError(f"xyz_max {xyz_max} must exceed xyz_min {xyz_min} in every axis")
    return lo, hi


def encode_history(xyz, history_start_id: int, num_bins: int = 1000,
                   xyz_min: Sequence[float] = DEFAULT_MIN, xyz_max: Sequence[float] = DEFAULT_MAX) -> torch.Tensor:
    """History positions [..., T, 3] (numpy or torch) -> token ids [..., 3T] (int64, same device)."""
    xyz = torch.as_tensor(np.asarray(xyz) if not torch.is_tensor(xyz) else xyz)
    if xyz.dim() < 2 or xyz.shape[-1] != 3:
        raise ValueError(f"history xyz must be [..., T, 3], got shape {tuple(xyz.shape)}")
    if not bool(torch.isfinite(xyz).all()):
        raise ValueError("history xyz contains NaN or inf")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    # float32 as the reference computes it (bins at exact .5 boundaries depend on precision).
    xyz = xyz.to(torch.float32)
    lo, hi = _bounds(xyz_min, xyz_max, xyz)
    padded = torch.cat([torch.zeros_like(xyz[..., :1, :]), xyz], dim=-2)
    deltas = padded[..., 1:, :] - padded[..., :-1, :]
    bins = torch.round((deltas - lo) / (hi - lo) * (num_bins - 1)).clamp(0, num_bins - 1).to(torch.long)
    return bins.flatten(-2) + history_start_id


def decode_history(ids, history_start_id: int, num_bins: int = 1000,
                   xyz_min: Sequence[float] = DEFAULT_MIN, xyz_max: Sequence[float] = DEFAULT_MAX) -> torch.Tensor:
    """Token ids [..., 3T] -> positions [..., T, 3] (float32) from bin centres, cumulatively summed."""
    ids = torch.as_tensor(ids)
    if ids.shape[-1] % 3 != 0:
        raise ValueError(f"history ids must be a multiple of 3 long, got {ids.shape[-1]}")
    bins = ids.to(torch.long) - history_start_id
    if bool(((bins < 0) | (bins >= num_bins)).any()):
        raise ValueError(f"history ids outside [{history_start_id}, {history_start_id + num_bins})")
    lo, hi = _bounds(xyz_min, xyz_max, bins)
    deltas = lo + bins.unflatten(-1, (-1, 3)).to(torch.float32) / (num_bins - 1) * (hi - lo)
    return deltas.cumsum(dim=-2)
