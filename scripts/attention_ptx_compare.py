"""Whether two versions of engine/attention_kernel.py compile the few-rows pointer kernel to the same sm_90 PTX.

    python scripts/attention_ptx_compare.py REV        # e.g. ecacf80: that commit's file against the working tree

No GPU needed (scripts/attention_compile_sm90.py's compile path). Compiles _slot_attention_fwd as the action pass
launches it on an H100 (bf16, D = 128, 64-row tiles, 7 key splits with the two-kernel merge, PDL with the K/V
prefetch and the early trigger, 4 warps, 4 stages) from both files and compares the PTX instruction lines, with
comments, debug records (.loc, .file, DWARF sections) and label numbers left out. Prints "same instructions" or a
diff of the first differing lines.
"""
import difflib
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import triton  # noqa: E402

import attention_compile_sm90 as C  # noqa: E402

PATH = "flashdrive_ros/engine/attention_kernel.py"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def instructions(module) -> list[str]:
    C.A = module
    C.INTS.update(n_splits=7, chunk=448)
    constexprs = dict(HEAD_DIM=128, BLOCK_D=128, PAD_D=False, BLOCK_M=64, BLOCK_N=64, SPLIT=True, FUSED=False,
                      GROUP=1, UPCAST=False, PRECISION="tf32", USE_PDL=True, PREFETCH=1, LINE=64, EARLY=True)
    kernel = triton.compile(C.source(module._slot_attention_fwd, constexprs, {}), target=C.SM90,
                            options=dict(num_warps=4, num_stages=4))
    lines = []
    in_debug = False
    for line in kernel.asm["ptx"].splitlines():
        if line.strip().startswith(".section"):
            in_debug = True  # the DWARF sections come last
        if in_debug:
            continue
        line = re.sub(r"//.*$", "", line).strip()
        if not line or line.startswith((".loc", ".file")) or re.fullmatch(r"\$L__\w+:", line):
            continue
        lines.append(re.sub(r"\$L__\w+", "L", line))
    return lines


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    old_src = subprocess.run(["git", "show", f"{sys.argv[1]}:{PATH}"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "attention_kernel_old.py"
        old_path.write_text(old_src)
        old = instructions(load(old_path, "attention_kernel_old"))
    new = instructions(load(ROOT / PATH, "attention_kernel_new"))
    print(f"{sys.argv[1]}: {len(old)} PTX instruction lines; working tree: {len(new)}")
    if old == new:
        print("same instructions")
    else:
        print("\n".join(list(difflib.unified_diff(old, new, lineterm="", n=1))[:40]))


if __name__ == "__main__":
    main()
