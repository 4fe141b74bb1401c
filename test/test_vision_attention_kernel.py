"""vision_attention_kernel: the vision tower's per-image attention with the head split into 64 + 16 lanes.

Specification: `vision_attention(q, k, v, n_images, scale)` = `vision_attention_reference` (SDPA inside
each image, output [N, H * D]) for any image size (key blocks cut short at the image's end), any head
dim that is a multiple of 8 (72 -> 64 unmasked lanes + 16 lanes with 72..79 masked; powers of two with
no rest), strided q/k/v (the qkv GEMM's [N, 3, H, D] output) and half or full precision. In fp32 it is
the reference to rounding (1e-5); in bf16 / fp16 the probabilities enter the value dot rounded to the
inputs' dtype, as in any flash attention, so it is as close to the fp32 reference as SDPA's own 16-bit
result is (within 2x of SDPA's error, plus a small floor).

The kernel runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton
compiles anything, so this file runs itself as a script in a fresh process that writes the outputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from interp_run import run_interpreted  # noqa: E402 (test/, beside this file)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flashdrive_ros.engine import vision_attention_kernel as vak  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# name: (dtype, images, patches per image, heads, head dim, layout, Config fields)
# layout "qkv": q/k/v are the strided slices of one [N, 3, H, D] tensor (v straight from the GEMM);
# "contiguous": three [N, H, D] tensors (q, k after the rotary).
CASES = {
    "bf16_d72_qkv": (BF16, 2, 50, 3, 72, "qkv", dict(block_m=32, block_n=16, num_warps=4, num_stages=1)),
    "bf16_d72_contiguous": (BF16, 3, 37, 2, 72, "contiguous", dict(block_m=16, block_n=32, num_warps=4, num_stages=1)),
    "bf16_d72_one_block": (BF16, 1, 20, 2, 72, "qkv", dict(block_m=32, block_n=32, num_warps=4, num_stages=1)),
    "fp16_d40": (FP16, 2, 33, 2, 40, "qkv", dict(block_m=16, block_n=16, num_warps=4, num_stages=1)),
    "bf16_d64_no_rest": (BF16, 2, 24, 2, 64, "qkv", dict(block_m=16, block_n=16, num_warps=4, num_stages=1)),
    "fp32_d24": (FP32, 2, 24, 2, 24, "qkv", dict(block_m=16, block_n=16, num_warps=4, num_stages=1)),
    "fp32_d72_default_config": (FP32, 2, 45, 2, 72, "contiguous", None),
}


def case_inputs(name: str):
    dtype, n_img, seq, heads, d, layout, _ = CASES[name]
    g = torch.Generator().manual_seed(len(name) * 7 + d)
    qkv = (torch.randn(n_img * seq, 3, heads, d, generator=g) * 1.5).to(dtype)
    q, k, v = qkv.unbind(1)
    if layout == "contiguous":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v, n_img, d ** -0.5


def reference(name: str) -> torch.Tensor:
    q, k, v, n_img, scale = case_inputs(name)
    return vak.vision_attention_reference(q.double(), k.double(), v.double(), n_img, scale)


# -------------------------------------------------------------- the interpreter subprocess

@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is installed by scripts/setup.sh; its interpreter runs the kernels")
    return run_interpreted(__file__, tmp_path_factory.mktemp("vision_attention") / "out.pt")


# --------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_per_image_sdpa(kernel_out, name):
    dtype = CASES[name][0]
    got, ref = kernel_out[name], reference(name)
    assert got.dtype == dtype and got.shape == ref.shape
    err = (got.double() - ref).abs().max().item()
    if dtype == FP32:
        assert err < 1e-5, err
    else:
        q, k, v, n_img, scale = case_inputs(name)
        sdpa_err = (vak.vision_attention_reference(q, k, v, n_img, scale).double() - ref).abs().max().item()
        assert err <= 2 * sdpa_err + 4 * torch.finfo(dtype).eps, (err, sdpa_err)


def test_images_do_not_see_each_other(kernel_out):
    """Changing the second image's keys/values leaves the first image's rows untouched."""
    assert torch.equal(kernel_out["isolation"][0], kernel_out["isolation"][1])
    assert not torch.equal(kernel_out["isolation"][2], kernel_out["isolation"][3])


@pytest.mark.parametrize("d,split", [(72, (64, 16)), (64, (64, 0)), (80, (64, 16)), (40, (32, 16)), (24, (16, 16)),
                                     (128, (128, 0)), (136, (128, 16)), (96, (64, 32))])
def test_head_split(d, split):
    assert vak.head_split(d) == split


@pytest.mark.parametrize("d", [12, 70, 8])
def test_head_dims_it_cannot_take_are_refused(d):
    with pytest.raises(ValueError, match="multiple of 8"):
        vak.head_split(d)


def test_what_it_refuses_goes_to_sdpa():
    q = torch.zeros(8, 2, 72, dtype=BF16)
    assert not vak.supports(q, q, q)  # CPU without the interpreter
    with pytest.raises(ValueError, match="one float dtype"):
        vak.vision_attention(q, q, q, 2, 1.0)


def test_rows_must_split_into_equal_images(monkeypatch):
    monkeypatch.setattr(vak, "available", lambda t: True)
    q = torch.zeros(9, 2, 72, dtype=BF16)
    with pytest.raises(ValueError, match="equal images"):
        vak.vision_attention(q, q, q, 2, 1.0)


# ------------------------------------------------------------------- run as a script (interpreted)

def _main(out_path: str) -> None:
    results = {}
    for name, (*_, config) in CASES.items():
        q, k, v, n_img, scale = case_inputs(name)
        results[name] = vak.vision_attention(q, k, v, n_img, scale,
                                             config=None if config is None else vak.Config(**config))
    # isolation: the same first image with two different second images
    q, k, v, n_img, scale = case_inputs("bf16_d72_qkv")
    cfg = vak.Config(**CASES["bf16_d72_qkv"][-1])
    seq = q.shape[0] // n_img
    k2, v2 = k.clone(), v.clone()
    k2[seq:] = torch.randn_like(k2[seq:].float()).to(k2.dtype)
    v2[seq:] = torch.randn_like(v2[seq:].float()).to(v2.dtype)
    a = vak.vision_attention(q, k, v, n_img, scale, config=cfg)
    b = vak.vision_attention(q, k2, v2, n_img, scale, config=cfg)
    results["isolation"] = (a[:seq], b[:seq], a[seq:], b[seq:])
    torch.save(results, out_path)


if __name__ == "__main__":
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1", "run by the tests with TRITON_INTERPRET=1"
    _main(sys.argv[1])
