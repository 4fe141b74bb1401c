"""Camera frames -> Qwen3-VL vision patches (alpamayo.md §3), in torch so it can run on the GPU.

Per image: smart resize to multiples of patch*merge (32) inside [min_pixels, max_pixels], bicubic
with antialias on uint8 levels (the reference resizes uint8 images), rescale 1/255,
normalize with mean = std = 0.5, duplicate the still image in time (temporal patch 2), and cut into
16x16 patches listed in 2x2 merge-block order. Each row is C x T x p x p = 1536 values.

Public API
----------
smart_resize(height, width, factor=32, min_pixels, max_pixels) -> (h, w)
image_grid(height, width, min_pixels, max_pixels, patch_size=16, merge_size=2) -> (1, gh, gw)
tokens_per_image(height, width, min_pixels, max_pixels, ...) -> gh * gw / merge^2   (180 real, 28 tiny)
preprocess_images(images, min_pixels, max_pixels, ...) -> (pixel_values [N_patches, 3*2*16*16], grid_thw [N, 3])
FrameUploader(device)(images) -> uint8 [N, H, W, 3] on the device (pinned staging on CUDA)
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 163840,
                 max_pixels: int = 196608) -> tuple[int, int]:
    """Closest size with both sides multiples of `factor` and area inside [min_pixels, max_pixels].

    Aspect ratio is kept as far as the rounding allows (Qwen2-VL/Qwen3-VL rule).
    1080x1920 with the real limits -> 320x576.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def image_grid(height: int, width: int, min_pixels: int, max_pixels: int, patch_size: int = 16,
               merge_size: int = 2) -> tuple[int, int, int]:
    """grid (t, h, w) in patches for one still image of the given original size."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return 1, h // patch_size, w // patch_size


def tokens_per_image(height: int, width: int, min_pixels: int, max_pixels: int, patch_size: int = 16,
                     merge_size: int = 2) -> int:
    """LLM tokens one image becomes after the merger."""
    _, gh, gw = image_grid(height, width, min_pixels, max_pixels, patch_size, merge_size)
    return gh * gw // (merge_size * merge_size)


def _as_batch(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] tensor from a numpy array / tensor [N,H,W,3] or [H,W,3]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] RGB (channels last), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    return images


def _resize_uint8_levels(x: torch.Tensor, h: int, w: int, native_uint8: bool | None = None) -> torch.Tensor:
    """Bicubic + antialias resize of uint8 [N, C, H, W] -> float32 holding uint8 levels.

    The reference resizes uint8 images, so the result is rounded to integer levels. On CPU torch
    has a native uint8 kernel (channels-last): ~10x faster than float and within one level of PIL.
    Elsewhere (CUDA) it is float bicubic, then clamp and round (within a few levels of PIL).
    native_uint8: force the choice (default: native on CPU only).
    """
    if (h, w) == tuple(x.shape[-2:]):
        return x.to(torch.float32)
    if native_uint8 is None:
        native_uint8 = x.device.type == "cpu"
    if native_uint8:
        x = x.contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).to(torch.float32)
    x = F.interpolate(x.to(torch.float32), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round()


class FrameUploader:
    """Same-size uint8 RGB images (a list of [H, W, 3] numpy arrays or torch tensors) -> one uint8 [N, H, W, 3]
    tensor on `device`.

    Camera frames at 1920x1080 are 6.2 MB each. From pageable numpy memory the copy to a GPU runs through the
    driver's own bounce buffers and blocks the host; here each image is copied once into a reused pinned
    buffer and its DMA is queued at once, so the host copy of image i+1 overlaps the transfer of image i, and
    no [N, H, W, 3] array is ever assembled on the host. The device buffer is reused too: its consumers run on
    the same stream, so the next upload is ordered after them. Off CUDA it is one np.stack.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        # per batch shape (a full prefill's 16 frames, a streaming step's 4): pinned buffer, device buffer and
        # the CUDA event after its last transfer; kept, because pinning memory again costs milliseconds
        self._buffers: dict[tuple, list] = {}

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        if not images:
            raise ValueError("no images to upload")
        shape = (len(images), *tuple(images[0].shape)) if hasattr(images[0], "shape") else (len(images),)
        for i, im in enumerate(images):
            if not isinstance(im, (np.ndarray, torch.Tensor)) or im.dtype not in (np.uint8, torch.uint8) \
                    or tuple(im.shape) != shape[1:] or len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"image {i}: expected uint8 [{', '.join(map(str, shape[1:]))}] like image 0 "
                                 f"(RGB, channels last), got {type(im).__name__} "
                                 f"{getattr(im, 'dtype', '')} {tuple(getattr(im, 'shape', ()))}")
        if any(isinstance(im, torch.Tensor) for im in images):
            # frames decoded on the device (nvJPEG) are there already: one device-side stack
            return torch.stack([torch.as_tensor(im).to(self.device, non_blocking=True) for im in images])
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(images)).to(self.device)
        if shape not in self._buffers:
            self._buffers[shape] = [torch.empty(shape, dtype=torch.uint8, pin_memory=True),
                                    torch.empty(shape, dtype=torch.uint8, device=self.device), None]
        pinned, dev, uploaded = self._buffers[shape]
        if uploaded is not None:
            uploaded.synchronize()  # never overwrite pinned memory a queued DMA still reads
        host = pinned.numpy()
        for i, im in enumerate(images):
            np.copyto(host[i], im)
            dev[i].copy_(pinned[i], non_blocking=True)
        self._buffers[shape][2] = torch.cuda.Event()
        self._buffers[shape][2].record()
        return dev


@functools.lru_cache(maxsize=64)
def _device_constants(mean: tuple, std: tuple, grid: tuple, device: torch.device):
    """mean, std [1, C, 1, 1] float32 and grid_thw [N, 3] int64 on `device`, made once: a fresh small tensor
    per call would be a synchronous host-to-device copy each step."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean_t, std_t, torch.tensor(grid, dtype=torch.long, device=device)


def preprocess_images(images, min_pixels: int, max_pixels: int, patch_size: int = 16,
                      temporal_patch_size: int = 2, merge_size: int = 2,
                      mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                      device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32,
                      uploader: FrameUploader | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames -> (pixel_values [N * gh * gw, 3 * T * p * p], grid_thw int64 [N, 3]).

    images: uint8 RGB, [N, H, W, 3] or [H, W, 3] (numpy or torch, any device), or a list of such
            arrays (sizes may differ; results are concatenated in order).
    device: where to compute (default: the input's device). Output dtype `dtype`.
    uploader: a FrameUploader for `device`; with it a list of same-size [H, W, 3] numpy images goes up
            as one batch without being stacked on the host first (the engine's path).
    Image order is kept: for Alpamayo pass camera-major, time-minor frames.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        if uploader is not None:
            batch = uploader(images)
            return preprocess_images(batch, min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size,
                                     mean, std, device, dtype)
        parts = [preprocess_images(im, min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size,
                                   mean, std, device, dtype) for im in images]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    batch = _as_batch(images)
    if device is not None:
        batch = batch.to(device)
    n, height, width, channels = batch.shape
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)

    x = _resize_uint8_levels(batch.permute(0, 3, 1, 2), h, w)
    gh, gw = h // patch_size, w // patch_size
    mean_t, std_t, grid_thw = _device_constants(tuple(map(float, mean)), tuple(map(float, std)),
                                                ((1, gh, gw),) * n, x.device)
    x = (x * (1.0 / 255.0) - mean_t) / std_t

    # A still image fills the temporal patch by repetition.
    m, p, t = merge_size, patch_size, temporal_patch_size
    x = x.unsqueeze(1).expand(n, t, channels, h, w)
    # [n, t, c, gh/m, m, p, gw/m, m, p] -> rows (n, gh/m, gw/m, m, m), columns (c, t, p, p)
    x = x.reshape(n, t, channels, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(n * gh * gw, channels * t * p * p).to(dtype)
    return pixel_values, grid_thw
