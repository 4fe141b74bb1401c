"""Compile slot_attention's many-rows kernels for sm_90 (H100 / H200) on a machine without a GPU.

    python scripts/attention_compile_sm90.py [BLOCK_M,BLOCK_N,WARPS,STAGES ...]   (default: the TMA sweep's)

Triton compiles for a named target without a driver, and its bundled ptxas and cuobjdump report what
the GPU would run: per config, for the pointer kernel (_slot_attention_fwd without split) and the TMA
kernel (Config(tma=True)), registers per thread, spill stack, shared memory per block, and how the K/V
loads were lowered (TMA copies, cp.async, or neither, i.e. not pipelined). Shapes and the integer
arguments' divisibility by 16 are those of the streaming prefill (bf16, D = 128, R = 3196 rows of
Q = 799 queries, N = 3136 keys of a 3152-slot cache, heads_last output), as Triton's JIT would
specialize them on the device. Over 232448 bytes of shared memory a config cannot launch on sm_90.
"""
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.backends.nvidia as nvidia_backend  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402

D, KV, R, Q, N, SLOTS = 128, 8, 3196, 799, 3136, 3152
SM90 = GPUTarget("cuda", 90, 32)
SHARED_MAX = 232448  # bytes of shared memory one block may use on sm_90
INTS = dict(  # the integer arguments' values at the streaming prefill
    sq_b=KV * R * D, sq_h=R * D, sq_r=D, sk_b=KV * SLOTS * D, sk_h=SLOTS * D, sk_n=D,
    sv_b=KV * SLOTS * D, sv_h=SLOTS * D, sv_n=D, so_b=Q * 32 * D, so_h=4 * D, so_j=D, so_q=32 * D,
    s_lim=1, n_kv=KV, n_rows=R, n_queries=Q, n_keys=N, chunk=N, n_splits=1)
POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", OUT="*bf16", LIMIT="*i64", COUNTER="*i32",
                O_PART="*fp32", M_PART="*fp32", L_PART="*fp32")


def source(fn, constexprs: dict, descriptors: dict) -> ASTSource:
    """fn's source with the JIT's specialization: ints equal to 1 become constants, pointers and
    ints divisible by 16 carry tt.divisibility 16."""
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptors:
            signature[name] = descriptors[name]
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif INTS[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if INTS[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def resources(compiled) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump"),
                                "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    shared = compiled.metadata.shared
    loads = collections.Counter(re.findall(r"ttng\.async_tma_copy_global_to_local|ttg\.async_copy_global_to_local",
                                           compiled.asm["ttgir"]))
    lowered = ("TMA copies" if loads["ttng.async_tma_copy_global_to_local"] else
               "cp.async" if loads["ttg.async_copy_global_to_local"] else "plain loads (not pipelined)")
    fits = "" if shared <= SHARED_MAX else "  TOO MUCH SHARED MEMORY"
    return f"{regs:>4} registers  stack {stack:>4} B  shared {shared:>6} B  {lowered}{fits}"


def compile_both(block_m: int, block_n: int, warps: int, stages: int) -> None:
    options = dict(num_warps=warps, num_stages=stages)
    common = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=False, PRECISION="tf32",
                  USE_PDL=False, PREFETCH=0, LINE=64, EARLY=False)
    pointer = source(A._slot_attention_fwd, dict(common, BLOCK_D=D, PAD_D=False, SPLIT=False, FUSED=False, GROUP=1), {})
    tma = source(A._slot_attention_tma_fwd, dict(common, SPLIT=False), dict(
        Q_DESC=f"tensordesc<bf16[1,1,{block_m},{D}]>", K_DESC=f"tensordesc<bf16[1,1,{block_n},{D}]>",
        V_DESC=f"tensordesc<bf16[1,1,{block_n},{D}]>"))
    for name, src in (("pointer", pointer), ("tma", tma)):
        label = f"bm{block_m} bn{block_n} w{warps} st{stages} {name:<8}"
        try:
            print(f"{label} {resources(triton.compile(src, target=SM90, options=options))}", flush=True)
        except Exception as e:  # a config the compiler rejects
            print(f"{label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


def main() -> None:
    configs = [tuple(int(x) for x in arg.split(",")) for arg in sys.argv[1:]] or [
        (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 2),
        (64, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3), (128, 128, 8, 4), (64, 128, 4, 4)]
    print(f"triton {triton.__version__}, target sm_90; streaming prefill R={R}, N={N}, D={D}, bf16")
    for config in configs:
        compile_both(*config)


if __name__ == "__main__":
    main()
