"""Device probe (issue 7, session 3): which of three ideas pays on the H100, before any engine change.

    python scripts/gpu_probe_session3.py [--out probe.json] [--only vision|prefetch]

1. Vision tower (4 images x 720 patches, width 1152, 16 heads of 72, MLP 4304, tanh GELU):
   a. attention [4, 16, 720, 72] through each SDPA backend, on the strided views vision_forward passes
      and on contiguous copies;
   b. fc1 + GELU(tanh) as two kernels against cuBLASLt's GELU epilogue (torch._addmm_activation), and
      their difference.
2. L2 prefetch of the next GEMM's weight while attention runs. 36 synthetic decoder layers with the
   real widths (LM at M = 8 rows: verify; expert at M = 64: action), each layer's weights in one buffer
   [qkv | o | gate_up | down] so that "the next bytes after attention" are one range, attention over a
   3 136-slot cache through engine.attention_kernel.slot_attention. The whole stack is one CUDA graph;
   its replay time is compared with and without a prefetch of the first P MB after qkv (o, then gate_up),
   issued just before attention by (bulk) cp.async.bulk.prefetch.L2, (line) prefetch.global.L2 per
   128-byte line, or (load) plain loads on a side stream.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def graph_ms(fn, replays: int = 20, warm: int = 3) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# ------------------------------------------------------------------------------------- 1. vision

def probe_vision() -> dict:
    out: dict = {}
    n_img, L, H, D, W, I = 4, 720, 16, 72, 1152, 4304
    qkv = torch.randn(n_img * L, 3, H, D, device=DEV, dtype=BF16)
    q, k, v = qkv.unbind(1)

    def per_image(t):
        return t.reshape(n_img, L, H, D).transpose(1, 2)

    views = [per_image(t) for t in (q, k, v)]
    contig = [t.contiguous() for t in views]
    ref = F.scaled_dot_product_attention(*[t.float() for t in contig])
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    reps = 27  # one per vision layer
    for layout, args in (("strided", views), ("contiguous", contig)):
        for name, be in backends.items():
            key = f"attn {layout} {name}"
            try:
                def call(args=args, be=be):
                    for _ in range(reps):
                        if be is None:
                            F.scaled_dot_product_attention(*args)
                        else:
                            with sdpa_kernel(be):
                                F.scaled_dot_product_attention(*args)
                if be is None:
                    o = F.scaled_dot_product_attention(*args)
                else:
                    with sdpa_kernel(be):
                        o = F.scaled_dot_product_attention(*args)
                err = float((o.float() - ref).abs().max())
                ms = graph_ms(call)
                out[key] = {"us_per_layer": 1000 * ms / reps, "max_abs_err": err}
            except Exception as e:  # a backend that refuses the shape
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(key, out[key], flush=True)
    # padded head dim 80 / 128 through flash (zero-padded q/k/v; scale kept at 1/sqrt(72))
    for pad in (80, 128):
        pq, pk, pv = [F.pad(t, (0, pad - D)).contiguous() for t in views]
        try:
            def callp(pq=pq, pk=pk, pv=pv):
                for _ in range(reps):
                    F.scaled_dot_product_attention(pq, pk, pv, scale=D ** -0.5)
            o = F.scaled_dot_product_attention(pq, pk, pv, scale=D ** -0.5)[..., :D]
            out[f"attn padded{pad} default"] = {"us_per_layer": 1000 * graph_ms(callp) / reps,
                                                "max_abs_err": float((o.float() - ref).abs().max())}
        except Exception as e:
            out[f"attn padded{pad} default"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"attn padded{pad}", out[f"attn padded{pad} default"], flush=True)

    # fc1 + GELU(tanh)
    x = torch.randn(n_img * L, W, device=DEV, dtype=BF16)
    w1 = torch.randn(I, W, device=DEV, dtype=BF16) * W ** -0.5
    b1 = torch.randn(I, device=DEV, dtype=BF16) * 0.1
    two = F.gelu(F.linear(x, w1, b1), approximate="tanh")
    fused = torch._addmm_activation(b1, x, w1.t(), use_gelu=True)
    exact = F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh")
    out["fc1 gelu"] = {
        "two_kernels_us": 1000 * graph_ms(lambda: [F.gelu(F.linear(x, w1, b1), approximate="tanh") for _ in range(27)]) / 27,
        "epilogue_us": 1000 * graph_ms(lambda: [torch._addmm_activation(b1, x, w1.t(), use_gelu=True) for _ in range(27)]) / 27,
        "linear_only_us": 1000 * graph_ms(lambda: [F.linear(x, w1, b1) for _ in range(27)]) / 27,
        "two_vs_fp32_max": float((two.float() - exact).abs().max()),
        "epilogue_vs_fp32_max": float((fused.float() - exact).abs().max()),
        "epilogue_vs_two_max": float((fused.float() - two.float()).abs().max()),
    }
    print("fc1 gelu", out["fc1 gelu"], flush=True)
    return out


# ----------------------------------------------------------------------------------- 2. prefetch

@triton.jit
def _prefetch_bulk(base, n_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, SINK):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start = i.to(tl.int64) * CHUNK
    size = tl.minimum(n_bytes - start, CHUNK)
    size = tl.where(start < n_bytes, size, 0).to(tl.int32)
    addr = base + start
    r = tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(SINK + tl.program_id(0), tl.sum(r, 0))


@triton.jit
def _prefetch_line(base, n_lines, BLOCK: tl.constexpr, SINK):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    addr = base + tl.minimum(i, n_lines - 1).to(tl.int64) * 128
    r = tl.inline_asm_elementwise(
        "{ prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
        "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(SINK + tl.program_id(0), tl.sum(r, 0))


@triton.jit
def _prefetch_load(X, n, BLOCK: tl.constexpr, ITERS: tl.constexpr, SINK):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
    tl.store(SINK + pid, tl.sum(acc, 0))


SINK = None


def prefetch(kind: str, t: torch.Tensor, n_bytes: int) -> None:
    global SINK
    if SINK is None:
        SINK = torch.zeros(1 << 16, device=DEV, dtype=torch.float32)
    if kind == "bulk":
        chunk, block = 16384, 128
        n = triton.cdiv(n_bytes, chunk)
        _prefetch_bulk[(triton.cdiv(n, block),)](t.data_ptr(), n_bytes, CHUNK=chunk, BLOCK=block, SINK=SINK.view(torch.int32),
                                                  num_warps=4)
    elif kind == "line":
        n = triton.cdiv(n_bytes, 128)
        block = 1024
        _prefetch_line[(triton.cdiv(n, block),)](t.data_ptr(), n, BLOCK=block, SINK=SINK.view(torch.int32), num_warps=4)
    elif kind == "load":
        n = n_bytes // t.element_size()
        block, iters = 2048, 8
        _prefetch_load[(triton.cdiv(n, block * iters),)](t, n, BLOCK=block, ITERS=iters, SINK=SINK, num_warps=8)
    else:
        raise ValueError(kind)


def make_stack(hidden, heads, inter, rows, n_layers=36, kv=8, d=128, n_keys=3136, limit=3121):
    nq, nkv = heads * d, kv * d
    sizes = [(nq + 2 * nkv) * hidden, hidden * nq, 2 * inter * hidden, hidden * inter]
    layers = []
    for _ in range(n_layers):
        buf = torch.empty(sum(sizes), device=DEV, dtype=BF16).normal_(0, hidden ** -0.5)
        parts = list(torch.split(buf, sizes))
        layers.append({
            "buf": buf,
            "qkv": parts[0].view(nq + 2 * nkv, hidden), "o": parts[1].view(hidden, nq),
            "gu": parts[2].view(2 * inter, hidden), "down": parts[3].view(hidden, inter),
            "after_qkv": buf[sizes[0]:],
            "k": torch.randn(1, kv, n_keys, d, device=DEV, dtype=BF16),
            "v": torch.randn(1, kv, n_keys, d, device=DEV, dtype=BF16),
            "nw": torch.ones(hidden, device=DEV, dtype=BF16),
        })
    x0 = torch.randn(1, rows, hidden, device=DEV, dtype=BF16)
    lim = torch.full((rows,), limit, device=DEV, dtype=torch.int32)
    g = heads // kv
    side = torch.cuda.Stream()

    def run(kind=None, mb=0.0):
        x = x0
        for L in layers:
            h = F.rms_norm(x, (hidden,), L["nw"], 1e-6)
            qkv = F.linear(h, L["qkv"])
            q = qkv[..., :nq].view(1, rows, kv, g, d).permute(0, 2, 3, 1, 4).reshape(1, kv, g * rows, d)
            nb = int(mb * 2 ** 20)
            if kind in ("bulk", "line") and nb:
                prefetch(kind, L["after_qkv"], nb)
            if kind == "load" and nb:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    prefetch("load", L["after_qkv"], nb)
            a = A.slot_attention(q, L["k"], L["v"], lim, heads_last=True)
            if kind == "load" and nb:
                torch.cuda.current_stream().wait_stream(side)
            x = x + F.linear(a.reshape(1, rows, nq), L["o"])
            h2 = F.rms_norm(x, (hidden,), L["nw"], 1e-6)
            gate, up = F.linear(h2, L["gu"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, L["down"])
        return x

    return run, layers


def probe_prefetch() -> dict:
    out: dict = {}
    cases = {
        "verify (LM, M=8)": dict(hidden=4096, heads=32, inter=12288, rows=8, mbs=(16, 33.5, 48)),
        "action (expert, M=64)": dict(hidden=2048, heads=16, inter=8256, rows=64, mbs=(8, 24, 40)),
    }
    for name, c in cases.items():
        mbs = c.pop("mbs")
        run, layers = make_stack(**c)
        ref = run()
        res = {"none": graph_ms(run)}
        print(name, "none", res["none"], flush=True)
        for kind in ("bulk", "line", "load"):
            for mb in mbs:
                key = f"{kind} {mb} MB"
                try:
                    y = run(kind, mb)
                    same = bool(torch.equal(y, ref))
                    res[key] = graph_ms(lambda: run(kind, mb))
                    if not same:
                        res[key + " (DIFFERENT OUTPUT)"] = True
                except Exception as e:
                    res[key] = f"{type(e).__name__}: {str(e)[:300]}"
                print(name, key, res[key], flush=True)
        # parts alone, for reference
        L0 = layers[0]
        rows, hidden = c["rows"], c["hidden"]
        xo = torch.randn(1, rows, L0["o"].shape[1], device=DEV, dtype=BF16)
        res["o gemm x36 alone"] = graph_ms(lambda: [F.linear(xo, L["o"]) for L in layers])
        res["attention x36 alone"] = graph_ms(lambda: [A.slot_attention(
            torch.randn(1, 8, rows * c["heads"] // 8, 128, device=DEV, dtype=BF16), L["k"], L["v"],
            torch.full((rows,), 3121, device=DEV, dtype=torch.int32), heads_last=True) for L in layers])
        out[name] = res
        del layers, run
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=("vision", "prefetch"), default=None)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    if args.only in (None, "vision"):
        res["vision"] = probe_vision()
    if args.only in (None, "prefetch"):
        res["prefetch"] = probe_prefetch()
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
