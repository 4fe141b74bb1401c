"""Image message payloads -> RGB uint8 [H, W, 3] (pure numpy + Pillow, no ROS, no OpenCV).

Works on plain values so it can be tested without ROS; ``decode_image_msg`` accepts either a
sensor_msgs/CompressedImage (has ``format``) or a sensor_msgs/Image (has ``encoding``) by duck typing.
Every failure raises ImageDecodeError with a message fit for /diagnostics.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

RAW_ENCODINGS = {  # encoding -> (channels, channel order to get RGB)
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, None),
}
# Refuse to decode anything larger than 8K x 8K: a corrupt header must not allocate gigabytes.
MAX_PIXELS = 8192 * 8192


class ImageDecodeError(ValueError):
    pass


def _check_size(img: np.ndarray, expected_hw: Optional[tuple]) -> np.ndarray:
    if expected_hw is not None and tuple(img.shape[:2]) != tuple(expected_hw):
        raise ImageDecodeError(f"wrong image size {img.shape[1]}x{img.shape[0]}, expected "
                               f"{expected_hw[1]}x{expected_hw[0]}")
    return img


def decode_compressed(data, fmt: str = "", expected_hw: Optional[tuple] = None) -> np.ndarray:
    """JPEG or PNG bytes -> RGB uint8. The container is recognised by its magic bytes (the ``format``
    string of image_transport varies: "jpeg", "png", "rgb8; jpeg compressed bgr8"); a format naming
    something else than what the bytes are is an error."""
    buf = bytes(data)
    if buf[:3] == b"\xff\xd8\xff":
        kind = "jpeg"
    elif buf[:8] == b"\x89PNG\r\n\x1a\n":
        kind = "png"
    else:
        raise ImageDecodeError(f"compressed image is neither JPEG nor PNG (format {fmt!r}, {len(buf)} bytes)")
    f = (fmt or "").lower()
    if f and "jpeg" not in f and "jpg" not in f and "png" not in f:
        raise ImageDecodeError(f"unsupported compressed format {fmt!r}")
    if f and kind == "jpeg" and "png" in f and "jpeg" not in f:
        raise ImageDecodeError(f"format {fmt!r} but the data is JPEG")
    if f and kind == "png" and "png" not in f:
        raise ImageDecodeError(f"format {fmt!r} but the data is PNG")
    from PIL import Image  # local import: Pillow is only needed for compressed transport

    try:
        with Image.open(io.BytesIO(buf)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageDecodeError(f"{kind} too large: {im.width}x{im.height}")
            im.load()  # full decode here so truncation/corruption raises now, not later
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow raises OSError / SyntaxError / ValueError for corrupt data
        raise ImageDecodeError(f"corrupt {kind}: {e}") from e
    return _check_size(rgb, expected_hw)


def decode_raw(data, width: int, height: int, step: int, encoding: str,
               expected_hw: Optional[tuple] = None) -> np.ndarray:
    """sensor_msgs/Image fields -> RGB uint8 (rgb8, bgr8, rgba8, bgra8, mono8)."""
    enc = (encoding or "").lower()
    if enc not in RAW_ENCODINGS:
        raise ImageDecodeError(f"unsupported image encoding {encoding!r} (supported: "
                               f"{', '.join(RAW_ENCODINGS)})")
    ch, order = RAW_ENCODINGS[enc]
    width, height, step = int(width), int(height), int(step)
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"empty image {width}x{height}")
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"image too large: {width}x{height}")
    if step < width * ch:
        raise ImageDecodeError(f"row step {step} < width*channels {width * ch} for {enc}")
    try:  # bytes / array.array (rclpy uint8[]) / ndarray without a copy; lists via asarray
        buf = np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        buf = np.asarray(data, dtype=np.uint8).reshape(-1)
    if buf.size != step * height:
        raise ImageDecodeError(f"image data has {buf.size} bytes, expected step*height = {step * height}")
    rows = buf.reshape(height, step)[:, : width * ch].reshape(height, width, ch)
    if order is None:
        rgb = np.repeat(rows, 3, axis=2)
    else:
        rgb = rows[:, :, list(order)]
    return _check_size(np.ascontiguousarray(rgb), expected_hw)


def decode_image_msg(msg, expected_hw: Optional[tuple] = None) -> np.ndarray:
    """CompressedImage or Image message (duck-typed) -> RGB uint8 [H, W, 3]."""
    if hasattr(msg, "format"):
        return decode_compressed(msg.data, msg.format, expected_hw)
    return decode_raw(msg.data, msg.width, msg.height, msg.step, msg.encoding, expected_hw)
