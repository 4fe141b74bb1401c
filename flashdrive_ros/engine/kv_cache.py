"""StaticKVCache: fixed-size K/V storage addressed by slot, keys kept pre-RoPE.

Each slot s has a fixed M-RoPE position `positions[:, s]` (t, h, w). Keys are stored as they come
out of k_norm, before rotation, so that K/V copied from one slot to another (streaming's frame
shift) is automatically rotated at its new slot's position when read (flashdrive.md §2). A rotated
mirror `k_rot` is kept up to date on write/shift/clear so reads cost nothing; `k` stays the
source of truth. Which slots are valid is the caller's attention mask's job, not the cache's.
"""

from __future__ import annotations

import torch

from .rope import apply_rotary, mrope_cos_sin


class StaticKVCache:
    """k, v, k_rot: [n_layers, batch, n_kv_heads, max_len, head_dim]; positions [3, max_len]."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 positions: torch.Tensor, rope_theta: float, mrope_section, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if min(n_layers, batch, n_kv_heads, max_len, head_dim) <= 0:
            raise ValueError("StaticKVCache sizes must all be positive")
        self.n_layers, self.batch, self.n_kv_heads = n_layers, batch, n_kv_heads
        self.max_len, self.head_dim = max_len, head_dim
        self.rope_theta, self.mrope_section = rope_theta, tuple(mrope_section)
        self.dtype, self.device = dtype, torch.device(device)
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.k_rot = torch.zeros(shape, dtype=dtype, device=self.device)
        self.set_positions(positions)

    @classmethod
    def for_config(cls, text_cfg, batch: int, max_len: int, positions: torch.Tensor,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "StaticKVCache":
        """A cache shaped for a TextConfig (the expert shares it: same layers / kv heads / head_dim)."""
        return cls(text_cfg.num_hidden_layers, batch, text_cfg.num_key_value_heads, max_len, text_cfg.head_dim,
                   positions, text_cfg.rope_theta, text_cfg.mrope_section, dtype, device)

    # ---- positions ----------------------------------------------------------------------------
    def set_positions(self, positions: torch.Tensor) -> None:
        """Install a new slot position table [3, max_len] and re-rotate every stored key."""
        if positions.shape != (3, self.max_len):
            raise ValueError(f"positions must be [3, {self.max_len}], got shape {tuple(positions.shape)}")
        self.positions = positions.to(self.device, torch.long).clone()
        # cos/sin kept in float32; rotation happens in the cache dtype (as transformers does).
        self.cos, self.sin = mrope_cos_sin(self.positions, self.head_dim, self.rope_theta, self.mrope_section)
        self.k_rot.copy_(apply_rotary(self.k, self.cos, self.sin))

    def cos_sin(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [Q, head_dim] of the given slots (for rotating queries written there)."""
        return self.cos[slots], self.sin[slots]

    # ---- writes -------------------------------------------------------------------------------
    def check_slots(self, slots: torch.Tensor, what: str = "slots") -> torch.Tensor:
        """Validate a slot index tensor (1-D integer, in range); returns it as long on the cache device."""
        return self._check_slots(slots, what)

    def _check_slots(self, slots: torch.Tensor, what: str) -> torch.Tensor:
        if slots.dim() != 1 or slots.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"{what} must be a 1-D integer tensor, got {slots.dtype} shape {tuple(slots.shape)}")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.max_len):
            raise IndexError(f"{what} out of range [0, {self.max_len}): min {int(slots.min())}, max {int(slots.max())}")
        return slots.to(self.device, torch.long)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, check: bool = True) -> None:
        """Store pre-RoPE keys and values [B|1, n_kv_heads, Q, head_dim] at `slots` [Q] of one layer.
        check=False skips the slot range check (a device sync); callers that validated the slots
        once per forward use it for the per-layer writes."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers})")
        if check:
            slots = self._check_slots(slots, "slots")
        expected = (self.n_kv_heads, slots.numel(), self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 4 or tuple(x.shape[1:]) != expected or x.shape[0] not in (1, self.batch):
                raise ValueError(f"{name} must be [1 or {self.batch}, {expected[0]}, {expected[1]}, {expected[2]}], "
                                 f"got {tuple(x.shape)}")
        self.k[layer, :, :, slots] = k.to(self.dtype)
        self.v[layer, :, :, slots] = v.to(self.dtype)
        self.k_rot[layer, :, :, slots] = apply_rotary(self.k[layer, :, :, slots], *self.cos_sin(slots))

    def shift(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy K/V of `src_slots` into `dst_slots` on all layers (one index copy); keys are
        re-rotated at the destination positions. Sources are read before any write."""
        src = self._check_slots(src_slots, "src_slots")
        dst = self._check_slots(dst_slots, "dst_slots")
        if src.shape != dst.shape:
            raise ValueError(f"src_slots ({src.numel()}) and dst_slots ({dst.numel()}) differ in length")
        self.k[:, :, :, dst] = self.k[:, :, :, src]
        self.v[:, :, :, dst] = self.v[:, :, :, src]
        self.k_rot[:, :, :, dst] = apply_rotary(self.k[:, :, :, dst], *self.cos_sin(dst))

    def clear(self, slots: torch.Tensor | None = None) -> None:
        """Zero the given slots (all slots when None)."""
        if slots is None:
            for t in (self.k, self.v, self.k_rot):
                t.zero_()
            return
        slots = self._check_slots(slots, "slots")
        for t in (self.k, self.v, self.k_rot):
            t[:, :, :, slots] = 0

    def repeat_batch(self, batch: int) -> None:
        """Turn a batch-1 cache into `batch` identical rows (one shared prefill -> K decoded samples)."""
        if self.batch != 1:
            raise ValueError(f"repeat_batch needs a batch-1 cache, this one has batch {self.batch}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.k, self.v, self.k_rot = (t.repeat(1, batch, 1, 1, 1) for t in (self.k, self.v, self.k_rot))
        self.batch = batch

    # ---- reads --------------------------------------------------------------------------------
    def rotated_keys(self, layer: int, n: int) -> torch.Tensor:
        """Keys of slots [0, n) of one layer, rotated at their slot positions: [batch, kv_heads, n, head_dim]."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"n = {n} must be in [0, {self.max_len}]")
        return self.k_rot[layer, :, :, :n]

    def values(self, layer: int, n: int) -> torch.Tensor:
        """Values of slots [0, n) of one layer: [batch, kv_heads, n, head_dim]."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"n = {n} must be in [0, {self.max_len}]")
        return self.v[layer, :, :, :n]
