"""What the H100 runs around programmatic dependent launch (PDL), read from the PTX that Triton compiles for
sm_90 on this CPU-only machine (no GPU needed to compile; the interpreter never runs these paths).

With PDL a kernel starts before its producer has finished. The few-row kernels use that start:
- before waiting (griddepcontrol.wait) they hint the first block of the data that does not come from the
  producer into L2: the GEMMs their weight rows, the attention its K / V chunk (prefetch.global.L2);
- with TRIGGER_EARLY they let their successor launch right after their own wait (launch_dependents), else
  once their main loop is done;
- and their main loop stays pipelined (cp.async), with the prefetch or without.
"""
import re

import pytest

WHY = "triton with its NVIDIA backend is installed by scripts/setup.sh; it compiles for sm_90 without a GPU"
triton = pytest.importorskip("triton", reason=WHY)
pytest.importorskip("triton.backends.nvidia", reason=WHY)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402
from flashdrive_ros.engine import linear_kernel as L  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
EVENTS = r"prefetch\.global\.L2|griddepcontrol\.wait|griddepcontrol\.launch_dependents|cp\.async\.cg\.shared\.global"


def _ptx(fn, constexprs: dict, pointers: dict, ints: dict, warps: int, stages: int) -> str:
    """fn compiled for sm_90 as Triton's JIT would specialise it: 16-divisible ints and pointers marked so."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if isinstance(ints[name], float) else "i32"
            if not isinstance(ints[name], float) and ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=SM90, options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]


def _order(ptx: str) -> list[str]:
    """The PDL-related instructions and cp.async loads in program order, repeats collapsed."""
    seq = []
    for m in re.finditer(EVENTS, ptx):
        name = m.group(0).split(".")[1] if m.group(0).startswith("griddepcontrol") else m.group(0).split(".")[0]
        if not seq or seq[-1] != name:
            seq.append(name)
    return seq


def _linear(prefetch: int, early: bool) -> str:  # the LM's o projection in a verify pass (M = 8)
    c = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT=False, HAS_BIAS=False, EVEN_N=True, EVEN_K=True,
             UPCAST=False, PRECISION="tf32", USE_PDL=True, PREFETCH=prefetch, LINE=64, EARLY=early,
             X_DESC=None, W_DESC=None, TMA=False)
    ptrs = dict.fromkeys(("X", "W", "B", "Y"), "*bf16") | {"P": "*fp32"}
    ints = dict(M=8, N=4096, K=4096, stride_xm=4096, stride_wn=4096, chunk=4096)
    return _ptx(L._skinny_linear_fwd, c, ptrs, ints, 4, 5)


def _swiglu(prefetch: int, early: bool) -> str:  # the expert's gate|up + SwiGLU (M = 64)
    c = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT=False, EVEN_N=True, EVEN_K=True, UPCAST=False,
             PRECISION="tf32", RNE_BF16=False, USE_PDL=True, PREFETCH=prefetch, LINE=64, EARLY=early,
             X_DESC=None, WG_DESC=None, WU_DESC=None, TMA=False)
    ptrs = dict.fromkeys(("X", "WG", "WU", "Y"), "*bf16") | {"P": "*fp32"}
    ints = dict(M=64, I=8256, K=2048, stride_xm=2048, stride_wn=2048, chunk=2048)
    return _ptx(L._skinny_swiglu_fwd, c, ptrs, ints, 4, 4)


def _attention(prefetch: int, early: bool) -> str:  # the action's 128 folded rows, 8 splits of 384 keys
    c = dict(HEAD_DIM=128, BLOCK_D=128, PAD_D=False, BLOCK_M=64, BLOCK_N=64, SPLIT=True, FUSED=False, GROUP=1,
             UPCAST=False, PRECISION="tf32", USE_PDL=True, PREFETCH=prefetch, LINE=64, EARLY=early)
    ptrs = dict.fromkeys(("Q", "K", "V", "OUT"), "*bf16") | dict.fromkeys(("O_PART", "M_PART", "L_PART"), "*fp32")
    ptrs |= {"LIMIT": "*i64", "COUNTER": "*i32"}
    ints = dict(sq_b=131072, sq_h=16384, sq_r=128, sk_b=3136 * 1024, sk_h=3136 * 128, sk_n=128, sv_b=3136 * 1024,
                sv_h=3136 * 128, sv_n=128, so_b=131072, so_h=256, so_j=128, so_q=2048, s_lim=1, n_kv=8,
                n_rows=128, n_queries=64, n_keys=3057, chunk=384, n_splits=8, qk_scale=0.1275)
    ints = {k: v for k, v in ints.items() if k != "s_lim"}
    c["s_lim"] = 1  # the JIT makes an int equal to 1 a constant
    return _ptx(A._slot_attention_fwd, c, ptrs, ints, 4, 4)


@pytest.mark.parametrize("kernel", [_linear, _swiglu, _attention], ids=["linear", "swiglu", "attention"])
def test_prefetch_is_issued_before_the_wait_and_the_loop_stays_pipelined(kernel):
    order = _order(kernel(prefetch=1, early=False))
    assert order[:2] == ["prefetch", "wait"]
    assert order.count("prefetch") == 1 and order.count("wait") == 1
    assert "cp" in order[2:], "the main loop's loads are no longer cp.async"
    without = _order(kernel(prefetch=0, early=False))
    assert "prefetch" not in without and without[0] == "wait"


@pytest.mark.parametrize("kernel", [_linear, _swiglu, _attention], ids=["linear", "swiglu", "attention"])
def test_early_trigger_launches_the_successor_right_after_the_wait(kernel):
    early = _order(kernel(prefetch=1, early=True))
    assert early[:3] == ["prefetch", "wait", "launch_dependents"]
    assert early.count("launch_dependents") == 1
    late = _order(kernel(prefetch=1, early=False))
    first_load = late.index("cp")
    assert late.count("launch_dependents") == 1 and late.index("launch_dependents") > first_load


def test_the_host_passes_the_switches_only_with_pdl(monkeypatch):
    """PREFETCH / EARLY reach the kernels through the launch options, and only when PDL is on."""
    import torch

    x = torch.zeros(8, 64)
    monkeypatch.setattr(L, "pdl_enabled", lambda t: True)
    monkeypatch.setattr(L, "PREFETCH_TILES", 1)
    monkeypatch.setattr(L, "TRIGGER_EARLY", True)
    assert L._gemm_pdl_options(x, 256) == dict(USE_PDL=True, launch_pdl=True, PREFETCH=1, LINE=32, EARLY=True)
    assert L._reduce_pdl_options(x) == dict(USE_PDL=True, launch_pdl=True, EARLY=True)
    monkeypatch.setattr(L, "PREFETCH_TILES", 0)
    monkeypatch.setattr(L, "TRIGGER_EARLY", False)
    assert L._gemm_pdl_options(x, 256) == dict(USE_PDL=True, launch_pdl=True)
    monkeypatch.setattr(L, "pdl_enabled", lambda t: False)
    assert L._gemm_pdl_options(x, 256) == {} and L._reduce_pdl_options(x) == {}
    monkeypatch.setattr(A, "PREFETCH_BLOCKS", 1)
    monkeypatch.setattr(A, "TRIGGER_EARLY", True)
    assert A._prefetch_options(True, x.bfloat16(), 128, 64) == dict(launch_pdl=True, PREFETCH=1, LINE=64, EARLY=True)
    assert A._prefetch_options(False, x.bfloat16(), 128, 64) == {}
