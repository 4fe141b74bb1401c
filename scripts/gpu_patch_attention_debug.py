"""Device check of patch_attention variants, each in its own process (a fault must not hide the others).

    python scripts/gpu_patch_attention_debug.py            # runs every variant in a subprocess
"""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ["d64_contig_bf16", "d72_contig_bf16", "d72_contig_fp32", "d72_strided_bf16", "d72_small_bf16",
            "d80_contig_bf16", "d96_contig_bf16"]


def one(name: str) -> None:
    import torch
    from flashdrive_ros.engine import patch_attention as P
    d = int(name.split("_")[0][1:])
    dtype = torch.float32 if name.endswith("fp32") else torch.bfloat16
    n_img, L, H = (1, 64, 1) if "small" in name else (4, 720, 16)
    qkv = torch.randn(n_img * L, 3, H, d, device="cuda", dtype=dtype)
    q, k, v = [t.reshape(n_img, L, H, d).transpose(1, 2) for t in qkv.unbind(1)]
    if "contig" in name:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = P.patch_attention(q, k, v, d ** -0.5)
    torch.cuda.synchronize()
    ref = P.patch_attention_reference(q, k, v, d ** -0.5)
    print(name, "ok, max abs err", float((o.float() - ref.float()).abs().max()))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        for v in VARIANTS:
            p = subprocess.run([sys.executable, __file__, v], capture_output=True, text=True)
            print(v, "rc", p.returncode, (p.stdout.strip() or p.stderr.strip().splitlines()[-1])[:300], flush=True)
