"""Vision preprocessing matches the Qwen2-VL/Qwen3-VL image processor (alpamayo.md §3)."""

import numpy as np
import pytest
import torch

from flashdrive_ros.engine.preprocess import image_grid, preprocess_images, smart_resize, tokens_per_image

REAL = dict(min_pixels=163840, max_pixels=196608)
TINY = dict(min_pixels=16384, max_pixels=32768)


def _camera_like_image(h, w, seed=0):
    """Gradients plus noise: smooth structure and high frequencies, uint8 RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def _reference_processor(min_pixels, max_pixels):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
               size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def test_smart_resize_real_and_tiny_sizes():
    assert smart_resize(1080, 1920, 32, **REAL) == (320, 576)
    assert image_grid(1080, 1920, **REAL) == (1, 20, 36)
    assert tokens_per_image(1080, 1920, **REAL) == 180
    assert smart_resize(1080, 1920, 32, **TINY) == (128, 224)
    assert tokens_per_image(1080, 1920, **TINY) == 28


def test_smart_resize_limits():
    # Small images grow to min_pixels, sizes stay multiples of the factor.
    h, w = smart_resize(100, 200, 32, **REAL)
    assert h % 32 == 0 and w % 32 == 0 and REAL["min_pixels"] <= h * w <= REAL["max_pixels"] * 1.2
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 32, **REAL)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, 32, min_pixels=10, max_pixels=5)


def test_shapes_and_value_range():
    imgs = np.stack([_camera_like_image(1080, 1920, s) for s in range(2)])
    pv, grid = preprocess_images(imgs, **REAL)
    assert pv.shape == (2 * 720, 1536) and pv.dtype == torch.float32
    assert grid.tolist() == [[1, 20, 36], [1, 20, 36]]
    assert pv.min() >= -1 and pv.max() <= 1


def test_unresized_image_equals_reference_exactly():
    # 320x576 needs no resize: only rescale, normalize, temporal duplication and patch order remain.
    img = _camera_like_image(320, 576)
    ref = _reference_processor(**REAL)(images=[img], return_tensors="pt")
    pv, grid = preprocess_images(img, **REAL)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(pv, ref["pixel_values"].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("limits", [REAL, TINY])
def test_resized_1080p_matches_reference_within_one_level(limits):
    img = _camera_like_image(1080, 1920, seed=3)
    ref = _reference_processor(**limits)(images=[img], return_tensors="pt")
    pv, grid = preprocess_images(img, **limits)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    diff = (pv - ref["pixel_values"].float()).abs()
    # PIL (the reference processor here) and torch's uint8 kernel both work in fixed point; they
    # may round a value differently by one uint8 level = 2/255 after normalisation.
    level = 2 / 255
    assert diff.max() < 1.01 * level
    assert (diff > 0.5 * level).float().mean() < 0.02


def test_float_resize_path_used_off_cpu_stays_close():
    # Devices without the uint8 kernel use float bicubic + rounding; emulate that on CPU.
    import flashdrive_ros.engine.preprocess as pre

    img = torch.from_numpy(_camera_like_image(1080, 1920, seed=4)).permute(2, 0, 1)[None]
    native = pre._resize_uint8_levels(img, 320, 576)
    as_float = pre._resize_uint8_levels(img, 320, 576, native_uint8=False)
    assert torch.equal(as_float, as_float.round()) and as_float.min() >= 0 and as_float.max() <= 255
    diff = (native - as_float).abs()
    assert diff.max() <= 6 and diff.mean() < 0.3  # in uint8 levels


def test_list_input_and_bad_input():
    a, b = _camera_like_image(320, 576, 1), _camera_like_image(640, 640, 2)
    pv, grid = preprocess_images([a, b], **REAL)
    pa, _ = preprocess_images(a, **REAL)
    assert grid.shape == (2, 3) and torch.equal(pv[: pa.shape[0]], pa)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images(a.astype(np.float32), **REAL)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        preprocess_images(a[..., :2], **REAL)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        preprocess_images("frame.png", **REAL)


def test_uploader_batch_equals_the_stacked_array():
    """A list of same-size frames through a FrameUploader gives exactly what the stacked array gives."""
    from flashdrive_ros.engine.preprocess import FrameUploader

    images = [_camera_like_image(270, 480, seed) for seed in range(4)]
    up = FrameUploader("cpu")
    a = preprocess_images(np.stack(images), **REAL)
    b = preprocess_images(images, **REAL, uploader=up)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(up(images), torch.from_numpy(np.stack(images)))


@pytest.mark.parametrize("images, message", [
    ([], "no images"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], r"image 1: expected uint8 \[8, 8, 3\]"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], "image 1: .* float32"),
    ([np.zeros((8, 8), np.uint8)], "image 0: .*channels last"),
])
def test_uploader_rejects_what_it_cannot_batch(images, message):
    from flashdrive_ros.engine.preprocess import FrameUploader

    with pytest.raises(ValueError, match=message):
        FrameUploader("cpu")(images)


def test_uploader_takes_frames_already_in_torch():
    """Frames decoded to torch tensors (on the GPU in the node, here on the CPU), also channel-first views
    permuted back to [H, W, 3] as nvJPEG gives them, batch like the numpy frames."""
    from flashdrive_ros.engine.preprocess import FrameUploader

    images = [_camera_like_image(64, 96, seed) for seed in range(3)]
    as_torch = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).permute(1, 2, 0) for im in images]
    mixed = [as_torch[0], images[1], as_torch[2]]
    up = FrameUploader("cpu")
    assert torch.equal(up(mixed), torch.from_numpy(np.stack(images)))
    with pytest.raises(ValueError, match="image 1"):
        up([as_torch[0], as_torch[1].float()])
