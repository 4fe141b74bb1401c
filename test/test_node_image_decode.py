"""Image decoding (pure): JPEG/PNG CompressedImage and rgb8/bgr8/mono8 Image -> RGB uint8, with clear
errors for wrong encoding, wrong size, inconsistent buffers and corrupt data."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from flashdrive_ros.nodes.image_decode import (ImageDecodeError, decode_compressed, decode_image_msg,
                                               decode_raw)


def make_image(h=48, w=64):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 % 256, y * 5 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def encode(img, fmt):
    b = io.BytesIO()
    Image.fromarray(img).save(b, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return b.getvalue()


def test_png_roundtrip_is_exact_and_jpeg_is_close():
    img = make_image()
    np.testing.assert_array_equal(decode_compressed(encode(img, "PNG"), "png"), img)
    out = decode_compressed(encode(img, "JPEG"), "jpeg")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 6


def test_image_transport_format_strings_are_accepted():
    img = make_image()
    assert decode_compressed(encode(img, "JPEG"), "rgb8; jpeg compressed bgr8").shape == img.shape
    assert decode_compressed(encode(img, "JPEG"), "").shape == img.shape


def test_corrupt_and_truncated_jpeg_raise():
    data = encode(make_image(), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt jpeg"):
        decode_compressed(data[: len(data) // 2], "jpeg")
    with pytest.raises(ImageDecodeError, match="neither JPEG nor PNG"):
        decode_compressed(b"not an image at all", "jpeg")
    with pytest.raises(ImageDecodeError):
        decode_compressed(b"", "jpeg")


def test_format_that_contradicts_the_data_raises():
    with pytest.raises(ImageDecodeError, match="data is PNG"):
        decode_compressed(encode(make_image(), "PNG"), "jpeg")
    with pytest.raises(ImageDecodeError, match="unsupported"):
        decode_compressed(encode(make_image(), "JPEG"), "tiff")


def test_raw_encodings_map_to_rgb():
    img = make_image()
    h, w, _ = img.shape
    np.testing.assert_array_equal(decode_raw(img.tobytes(), w, h, w * 3, "rgb8"), img)
    np.testing.assert_array_equal(decode_raw(img[:, :, ::-1].tobytes(), w, h, w * 3, "bgr8"), img)
    mono = img[:, :, 0]
    np.testing.assert_array_equal(decode_raw(mono.tobytes(), w, h, w, "mono8"), np.repeat(mono[..., None], 3, 2))
    # padded rows (step > width * channels) are cropped
    padded = np.zeros((h, w * 3 + 8), np.uint8)
    padded[:, : w * 3] = img.reshape(h, -1)
    np.testing.assert_array_equal(decode_raw(padded.tobytes(), w, h, w * 3 + 8, "rgb8"), img)


@pytest.mark.parametrize("encoding", ["16UC1", "yuv422", "bayer_rggb8", ""])
def test_unsupported_raw_encoding_raises(encoding):
    with pytest.raises(ImageDecodeError, match="unsupported image encoding"):
        decode_raw(b"\0" * 12, 2, 2, 6, encoding)


def test_raw_buffer_size_and_step_are_checked():
    with pytest.raises(ImageDecodeError, match="expected step"):
        decode_raw(b"\0" * 10, 2, 2, 6, "rgb8")
    with pytest.raises(ImageDecodeError, match="row step"):
        decode_raw(b"\0" * 8, 2, 2, 4, "rgb8")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_raw(b"", 0, 0, 0, "rgb8")


def test_expected_size_is_enforced():
    img = make_image(48, 64)
    with pytest.raises(ImageDecodeError, match="wrong image size 64x48, expected 32x24"):
        decode_compressed(encode(img, "PNG"), "png", expected_hw=(24, 32))
    assert decode_raw(img.tobytes(), 64, 48, 192, "rgb8", expected_hw=(48, 64)).shape == (48, 64, 3)


def test_message_dispatch_by_fields():
    img = make_image()
    comp = SimpleNamespace(format="png", data=encode(img, "PNG"))
    raw = SimpleNamespace(encoding="rgb8", width=64, height=48, step=192, data=list(img.tobytes()))
    np.testing.assert_array_equal(decode_image_msg(comp), img)
    np.testing.assert_array_equal(decode_image_msg(raw), img)


# --- the nvJPEG path, with torchvision's decode_jpeg replaced by a stand-in that decodes on the CPU the way
# nvJPEG answers (a [3, H, W] tensor per frame; a batch with one undecodable frame raises RuntimeError)
class _FakeNvJpeg:
    def __init__(self):
        self.batches = []

    def __call__(self, data, mode=None, device=None):
        import torch
        self.batches.append(len(data) if isinstance(data, list) else 1)
        frames = data if isinstance(data, list) else [data]
        out = []
        for d in frames:
            if b"\xff\xc2" in d.numpy().tobytes()[:2000]:  # progressive: a flavour this nvJPEG refuses
                raise RuntimeError("nvjpeg: unsupported jpeg")
            try:
                out.append(torch.from_numpy(decode_compressed(d.numpy().tobytes(), "jpeg").copy()).permute(2, 0, 1))
            except ImageDecodeError as e:
                raise RuntimeError(f"nvjpeg: {e}") from e
        return out if isinstance(data, list) else out[0]


def _nvjpeg_decoder():
    import torch

    from flashdrive_ros.nodes.image_decode import NvJpegDecoder
    dec = object.__new__(NvJpegDecoder)  # no torchvision / CUDA here: the stand-in plays nvJPEG
    dec._torch, dec._decode_jpeg, dec._rgb, dec.device = torch, _FakeNvJpeg(), None, torch.device("cpu")
    return dec


def _jpeg_msg(img, fmt="jpeg", data=None):
    return SimpleNamespace(format=fmt, data=encode(img, "JPEG") if data is None else data)


def test_nvjpeg_decoder_gives_hwc_frames_in_message_order():
    dec = _nvjpeg_decoder()
    imgs = [make_image(), make_image()[::-1].copy(), make_image()[:, ::-1].copy()]
    out = dec.decode_many([_jpeg_msg(im) for im in imgs])
    for im, t in zip(imgs, out):
        assert tuple(t.shape) == im.shape and str(t.dtype) == "torch.uint8"
        np.testing.assert_array_equal(t.numpy(), decode_compressed(encode(im, "JPEG"), "jpeg"))
    assert dec._decode_jpeg.batches == [3]  # one batch for the window


def test_nvjpeg_decoder_loses_no_good_frame_and_reports_bad_ones():
    """A frame nvJPEG refuses fails its batch: the rest still decode on the GPU and that one on the host; a
    truncated frame (no end marker) never reaches nvJPEG (which may not notice) but Pillow, which raises;
    the header and format checks come first."""
    from flashdrive_ros.nodes.image_decode import NvJpegDecoder

    dec = _nvjpeg_decoder()
    img = make_image(240, 320)
    good = encode(img, "JPEG")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, progressive=True)
    progressive = buf.getvalue()
    msgs = [_jpeg_msg(None, data=good), _jpeg_msg(None, data=progressive), _jpeg_msg(None, data=good[:-300]),
            _jpeg_msg(None, fmt="png", data=good), _jpeg_msg(None, data=b"\xff\xd8\xff" + bytes(20))]
    out = dec.decode_many(msgs)
    np.testing.assert_array_equal(out[0].numpy(), decode_compressed(good, "jpeg"))
    np.testing.assert_array_equal(out[1].numpy(), decode_compressed(progressive, "jpeg"))
    assert isinstance(out[2], ImageDecodeError) and "corrupt jpeg" in str(out[2])
    assert isinstance(out[3], ImageDecodeError) and "data is JPEG" in str(out[3])
    assert isinstance(out[4], ImageDecodeError) and "corrupt jpeg" in str(out[4])
    assert dec._decode_jpeg.batches == [2, 1, 1]  # the batch of frames 0 and 1, then each alone
    assert NvJpegDecoder.handles(msgs[0]) and not NvJpegDecoder.handles(_jpeg_msg(None, data=encode(img, "PNG")))
    assert not NvJpegDecoder.handles(SimpleNamespace(encoding="rgb8", data=bytes(12)))


def test_nvjpeg_decoder_says_what_it_needs():
    from flashdrive_ros.nodes.image_decode import NvJpegDecoder
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs torchvision"):
            NvJpegDecoder("cuda")
    else:
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            NvJpegDecoder("cpu")
