"""Qwen3-VL vision tower: transformers' Qwen3VLVisionModel built from our VisionConfig.

It is used as is (parameter names = checkpoint keys under vlm.model.visual.*); this file only
builds it and calls it. `encode_images` returns the merged image embeddings (one row per LLM
image token, in prompt order) and the deepstack features the text model adds after its first layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

from .config import VisionConfig


def hf_vision_config(cfg: VisionConfig, attn_implementation: str = "sdpa") -> Qwen3VLVisionConfig:
    """The transformers config equivalent to `cfg`."""
    hf = Qwen3VLVisionConfig(
        depth=cfg.depth, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_heads=cfg.num_heads, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size, spatial_merge_size=cfg.spatial_merge_size,
        out_hidden_size=cfg.out_hidden_size, num_position_embeddings=cfg.num_position_embeddings,
        deepstack_visual_indexes=list(cfg.deepstack_visual_indexes), hidden_act=cfg.hidden_act,
    )
    hf._attn_implementation = attn_implementation
    return hf


def build_vision_tower(cfg: VisionConfig, attn_implementation: str = "sdpa") -> Qwen3VLVisionModel:
    return Qwen3VLVisionModel(hf_vision_config(cfg, attn_implementation))


@dataclass
class ImageFeatures:
    embeds: torch.Tensor            # [n_tokens, out_hidden]: one row per image token, images in order
    deepstack: list[torch.Tensor]   # per deepstack level, [n_tokens, out_hidden]
    tokens_per_image: list[int]


def encode_images(tower: Qwen3VLVisionModel, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> ImageFeatures:
    """pixel_values [N_patches, C*T*p*p] (2x2 merge-block order) + grid_thw [n_images, 3] -> features."""
    cfg = tower.config
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values must be [N, {patch_dim}], got {tuple(pixel_values.shape)}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [n_images, 3], got {tuple(grid_thw.shape)}")
    n_patches = int(grid_thw.prod(-1).sum())
    if n_patches != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {n_patches} patches but pixel_values has {pixel_values.shape[0]}")
    merge = cfg.spatial_merge_size
    if bool(((grid_thw[:, 1:] % merge) != 0).any()):
        raise ValueError(f"grid h and w must be multiples of spatial_merge_size {merge}: {grid_thw.tolist()}")
    dtype = tower.patch_embed.proj.weight.dtype
    out = tower(pixel_values.to(dtype), grid_thw=grid_thw, return_dict=True)
    per_image = (grid_thw.prod(-1) // merge ** 2).tolist()
    return ImageFeatures(embeds=out.pooler_output, deepstack=list(out.deepstack_features),
                         tokens_per_image=[int(x) for x in per_image])
