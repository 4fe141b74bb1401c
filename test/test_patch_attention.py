"""patch_attention (engine/patch_attention.py): attention among the patches of each image, head dims split
into an unmasked power-of-two part and a padded tail. The Triton kernel runs on the CPU through Triton's
interpreter in one fresh process (TRITON_INTERPRET=1 must be set before triton's jit runs) and is compared
with the PyTorch specification `patch_attention_reference`."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashdrive_ros.engine import patch_attention as P

HERE = Path(__file__).resolve().parent
TOL = dict(rtol=1e-4, atol=1e-5)


def _qkv_views(n_img, length, heads, d, seed, dtype=torch.float32):
    """q, k, v as the vision tower passes them: strided views [n_img, heads, L, d] of one
    [n_img * L, 3, heads, d] projection output."""
    qkv = torch.randn(n_img * length, 3, heads, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return [t.reshape(n_img, length, heads, d).transpose(1, 2) for t in qkv.unbind(1)]


CASES = {
    # the tower's head dim 72 = 64 unmasked + 8 of a 16-lane tail; 100 patches: a partial last key block
    "d72_partial_blocks": lambda: (*_qkv_views(3, 100, 2, 72, 1), 72 ** -0.5),
    "d24_one_block": lambda: (*_qkv_views(2, 20, 2, 24, 2), None),
    "d64_no_tail": lambda: (*_qkv_views(2, 70, 1, 64, 3), 0.2),
    "d72_bf16": lambda: (*_qkv_views(2, 65, 2, 72, 4, torch.bfloat16), 72 ** -0.5),
}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if P.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("patch_attention_interp")
    inputs = {name: build() for name, build in CASES.items()}
    torch.save(inputs, d / "cases.pt")
    proc = subprocess.run([sys.executable, str(HERE / "patch_attention_interp.py"), str(d / "cases.pt"),
                           str(d / "out.pt")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(d / "out.pt", weights_only=False)
    return {name: (inputs[name], out[name]) for name in CASES}


@pytest.mark.parametrize("name", [n for n in CASES if "bf16" not in n])
def test_kernel_equals_the_reference(kernel, name):
    (q, k, v, scale), out = kernel[name]
    ref = P.patch_attention_reference(q, k, v, scale)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # [n_img, L, heads, D]
    torch.testing.assert_close(out, ref, **TOL)


def test_bf16_output_is_close_to_the_fp32_softmax(kernel):
    (q, k, v, scale), out = kernel["d72_bf16"]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), P.patch_attention_reference(q.float(), k.float(), v.float(), scale).float(),
                               rtol=1e-2, atol=1e-2)


def test_reference_is_sdpa_per_image_in_the_projection_layout():
    q, k, v = _qkv_views(2, 30, 3, 72, 5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1)
    torch.testing.assert_close(P.patch_attention_reference(q, k, v, 0.1), sdpa.transpose(1, 2), **TOL)


@pytest.mark.parametrize("d, split", [(72, (64, 16)), (128, (128, 0)), (24, (16, 16)), (80, (64, 16)), (96, (64, 32))])
def test_head_dim_split(d, split):
    assert P.split_head_dim(d) == split


@pytest.mark.parametrize("d", [8, 20, 264])
def test_head_dims_must_be_multiples_of_8_from_16_to_256(d):
    with pytest.raises(ValueError, match="multiple of 8"):
        P.split_head_dim(d)


def test_without_triton_on_the_cpu_it_is_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv_views(1, 10, 2, 72, 6)
    assert torch.equal(P.patch_attention(q, k, v), P.patch_attention_reference(q, k, v))
