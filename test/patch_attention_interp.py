"""Runs patch_attention under Triton's interpreter in a fresh process (helper of test_patch_attention.py).

    python test/patch_attention_interp.py CASES.pt RESULTS.pt

CASES.pt maps a name to (q, k, v, scale); RESULTS.pt maps it to the kernel's output.
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.engine import patch_attention as P  # noqa: E402


def main(cases_path: str, results_path: str) -> None:
    cases = torch.load(cases_path, weights_only=False)
    torch.save({name: P.patch_attention(*args) for name, args in cases.items()}, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
