"""Multimodal rotary position embedding (M-RoPE) of the Qwen3-VL text model.

Every token has a 3-axis position (t, h, w). Text tokens use the same value on all three axes;
an image's merged tokens use (offset, offset + row, offset + col) and the text after it resumes at
max + 1 (`rope_index`). Frequencies are assigned to axes interleaved: frequency slot j belongs to
H when j % 3 == 1 and j < 3 * section[1], to W when j % 3 == 2 and j < 3 * section[2], otherwise
to T (transformers' Qwen3-VL layout), and the rotation pairs dimension i with i + head_dim/2.
"""

from __future__ import annotations

import torch


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int,
               spatial_merge_size: int, start: int = 0) -> tuple[torch.Tensor, int]:
    """M-RoPE positions of one token sequence (transformers' `get_rope_index` for images).

    input_ids: LongTensor [L]; image_grid_thw: [n_images, 3] patch grids in prompt order; each
    image is a run of t*h*w / merge^2 `image_token_id` tokens. Returns (positions [3, L] long,
    next_position) where next_position = max + 1 is where following text continues.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D [L], got shape {tuple(input_ids.shape)}")
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    is_image = (input_ids == image_token_id).tolist()
    pieces = []
    pos = start
    i, n, g = 0, len(is_image), 0
    while i < n:
        if not is_image[i]:
            j = i
            while j < n and not is_image[j]:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        if g >= len(grids):
            raise ValueError(f"more image-token runs than image_grid_thw entries ({len(grids)})")
        t, h, w = grids[g]
        if h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"image {g}: grid {grids[g]} not divisible by spatial_merge_size {spatial_merge_size}")
        lh, lw = h // spatial_merge_size, w // spatial_merge_size
        count = t * lh * lw
        if i + count > n or not all(is_image[i:i + count]):
            raise ValueError(f"image {g}: grid {grids[g]} needs {count} consecutive image tokens at index {i}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(lh), torch.arange(lw), indexing="ij")
        pieces.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos)
        pos += max(t, lh, lw)  # next text position = max + 1 (still images: t = 1)
        i += count
        g += 1
    if g != len(grids):
        raise ValueError(f"{len(grids)} image grids given but {g} image-token runs found")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions.long(), pos


def extend_positions(positions: torch.Tensor, total_len: int) -> torch.Tensor:
    """Append consecutive text positions (equal on all axes) after max + 1 up to `total_len` slots."""
    if positions.dim() != 2 or positions.shape[0] != 3:
        raise ValueError(f"positions must be [3, L], got shape {tuple(positions.shape)}")
    extra = total_len - positions.shape[1]
    if extra < 0:
        raise ValueError(f"total_len {total_len} is shorter than the {positions.shape[1]} given positions")
    nxt = int(positions.max()) + 1 if positions.numel() else 0
    tail = torch.arange(nxt, nxt + extra, device=positions.device).expand(3, -1)
    return torch.cat([positions, tail.to(positions.dtype)], dim=1)


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Standard RoPE inverse frequencies [head_dim/2] (float32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def axis_of_frequency(head_dim: int, mrope_section) -> torch.Tensor:
    """For each of the head_dim/2 frequency slots, the axis (0=t, 1=h, 2=w) it reads (interleaved)."""
    half = head_dim // 2
    if sum(mrope_section) != half:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {half}")
    axis = torch.zeros(half, dtype=torch.long)
    j = torch.arange(half)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, mrope_section,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for positions [3, N] (angles computed in float32, then cast)."""
    if positions.dim() != 2 or positions.shape[0] != 3:
        raise ValueError(f"positions must be [3, N], got shape {tuple(positions.shape)}")
    freqs = inv_freq(head_dim, theta).to(positions.device)
    angles = positions.float()[..., None] * freqs  # [3, N, half]
    axis = axis_of_frequency(head_dim, mrope_section).to(positions.device)
    picked = angles.gather(0, axis.view(1, 1, -1).expand(1, angles.shape[1], -1))[0]  # [N, half]
    emb = torch.cat([picked, picked], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., N, head_dim] by cos/sin [N, head_dim] (or broadcastable), in x's dtype."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
