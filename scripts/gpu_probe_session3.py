"""Device probe (issue 7, session 3): which of three ideas pays on the H100, before any engine change.

    python scripts/gpu_probe_session3.py [--out probe.json] [--only vision prefetch vision_kernel few_rows]

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
3. slot_attention at the vision shape (head dim 72 padded to 128 lanes) against cuDNN, with a config sweep.
4. Few-rows slot_attention (decode R=4, verify R=32, action R=128) with the two-kernel merge: the
   default plan and a sweep of blocks / warps / stages / split counts.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402
from gpu_timing import graph_ms  # noqa: E402 (scripts/, beside this file)

DEV = "cuda"
BF16 = torch.bfloat16


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


# ------------------------------------------------------------------- 3. vision attention kernel

def probe_vision_kernel() -> dict:
    """slot_attention at the vision shape (padded head lanes) against cuDNN, per layer."""
    import itertools
    out: dict = {}
    n_img, L, H, D = 4, 720, 16, 72
    qkv = torch.randn(27, n_img * L, 3, H, D, device=DEV, dtype=BF16)  # 27 layers: rotate, as the tower

    def views(i):
        return [t.reshape(n_img, L, H, D).transpose(1, 2) for t in qkv[i].unbind(1)]

    lim = torch.full((L,), L, device=DEV, dtype=torch.int32)
    ref = F.scaled_dot_product_attention(*views(0), scale=D ** -0.5)  # [n_img, H, L, D]
    out["cudnn us"] = 1000 * graph_ms(lambda: [F.scaled_dot_product_attention(*views(i), scale=D ** -0.5)
                                                for i in range(27)]) / 27
    cfgs = [None] + [A.Config(bm, bn, w, st, 1) for bm, bn, w, st in
                     itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)) if not (bm == 128 and w == 4 and bn == 128)]
    for cfg in cfgs:
        name = "default" if cfg is None else f"bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} st{cfg.num_stages}"
        try:
            o = A.slot_attention(*views(0), lim, scale=D ** -0.5, config=cfg, heads_last=True)
            err = float((o.float() - ref.transpose(1, 2).float()).abs().max())
            us = 1000 * graph_ms(lambda: [A.slot_attention(*views(i), lim, scale=D ** -0.5, config=cfg, heads_last=True)
                                          for i in range(27)]) / 27
            out[name] = {"us": us, "max_abs_err": err}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print("vision kernel", name, out[name], flush=True)
    return out


# ------------------------------------------------------------- 4. few-rows attention (two-kernel merge)

def probe_few_rows(budget_s: float = 150.0, fused_top: int = 0, only_default: bool = False,
                   merge_sweep: bool = False) -> dict:
    """Two-kernel slot_attention configs at decode / verify / action rows, K/V rotated over 8 layers
    of a 3 136-slot cache (from HBM), 3 057 valid keys. Per case: the default plan and a sweep."""
    import itertools
    import time
    from dataclasses import replace
    t0 = time.perf_counter()
    KV, N, VALID, LAYERS = 8, 3136, 3057, 8
    kc = torch.randn(LAYERS, 1, KV, N + 16, 128, device=DEV, dtype=BF16)
    vc = torch.randn(LAYERS, 1, KV, N + 16, 128, device=DEV, dtype=BF16)
    cases = {"decode R=4": (4, torch.tensor([VALID])),
             "verify R=32": (4, torch.clamp(torch.arange(VALID - 8, VALID) + 1, max=VALID)),
             "action R=128": (2, torch.full((64,), VALID))}
    out: dict = {}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (g, limit) in cases.items():
        limit = limit.to(DEV)
        rows = g * limit.numel()
        qs = [torch.randn(1, KV, rows, 128, device=DEV, dtype=BF16) for _ in range(3)]
        ref = A.slot_attention_reference(qs[0], kc[0, :, :, :N], vc[0, :, :, :N], limit)
        res = {}

        def timed(cfg, label):
            try:
                o = A.slot_attention(qs[0], kc[0, :, :, :N], vc[0, :, :, :N], limit, config=cfg)
                err = float((o.float() - ref.float()).norm() / ref.float().norm())
                n_calls = 24

                def calls():
                    for i in range(n_calls):
                        A.slot_attention(qs[i % 3], kc[i % LAYERS, :, :, :N], vc[i % LAYERS, :, :, :N], limit, config=cfg)
                res[label] = {"us": 1000 * graph_ms(calls, replays=10) / n_calls, "rel_l2": err}
            except Exception as e:
                res[label] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}

        p = A.plan(KV, rows, N, sms)
        timed(None, f"default bm{p.config.block_m} bn{p.config.block_n} w{p.config.num_warps} st{p.config.num_stages} sp{p.splits}")
        if merge_sweep:  # the default plan with other launches of the two-kernel merge (A.MERGE)
            before = A.MERGE
            for mr, mw in ((1, 4), (1, 2), (1, 1), (2, 4), (2, 2), (4, 4), (4, 2), (8, 4), (8, 8), (16, 4), (16, 8)):
                A.MERGE = (mr, mw)
                timed(None, f"merge rows{mr} w{mw}")
            A.MERGE = before
        bms = [] if only_default else [m for m in (16, 32, 64, 128) if m <= max(16, rows)]
        if only_default:  # the default plan's tiles at neighbouring split counts
            for sp in (p.splits - 2, p.splits - 1, p.splits, p.splits + 1, p.splits + 2):
                if sp > 1:
                    cfg = replace(p.config, splits=sp, fused_merge=False)
                    timed(cfg, f"bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} st{cfg.num_stages} sp{A.plan(KV, rows, N, sms, cfg).splits}")
        for bm, bn, w, st, sp in itertools.product(bms, (64, 128), (4, 8), (2, 3, 4), (4, 6, 8, 9, 10, 12, 13, 16, 20, 25)):
            if time.perf_counter() - t0 > budget_s:
                break
            if w == 8 and bm < 64:
                continue
            cfg = A.Config(bm, bn, w, st, sp, fused_merge=False)
            pl = A.plan(KV, rows, N, sms, cfg)
            label = f"bm{bm} bn{bn} w{w} st{st} sp{pl.splits}"
            if label not in res:
                timed(cfg, label)
        good = sorted(((v["us"], k) for k, v in res.items() if "us" in v and v["rel_l2"] < 1e-2))
        if fused_top:  # the fused merge (one kernel) for the best two-kernel tiles
            for _, label in good[:fused_top]:
                if label.startswith("default"):
                    continue
                bm, bn, w, st, sp = (int(t.lstrip("bmnwstp")) for t in label.split())
                for mg in (1, 2, 4):
                    cfg = A.Config(bm, bn, w, st, sp, fused_merge=True, merge_group=mg)
                    timed(cfg, f"{label} fused/g{A.plan(KV, rows, N, sms, cfg).merge_group}")
            good = sorted(((v["us"], k) for k, v in res.items() if "us" in v and v["rel_l2"] < 1e-2))
        print(name, "default:", [(k, v) for k, v in res.items() if k.startswith("default")], flush=True)
        print(name, "best 8:", [f"{u:.1f} {k}" for u, k in good[:8]], flush=True)
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--fused-top", type=int, default=0, help="few_rows: also time the fused merge for the best N tiles")
    ap.add_argument("--only-default", action="store_true", help="few_rows: the default plan's tiles only (no sweep)")
    ap.add_argument("--merge-sweep", action="store_true", help="few_rows: the default plan with other merge launches")
    ap.add_argument("--only", nargs="*", choices=("vision", "prefetch", "vision_kernel", "few_rows"), default=None)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    only = args.only or ("vision", "prefetch", "vision_kernel", "few_rows")
    if "vision" in only:
        res["vision"] = probe_vision()
    if "prefetch" in only:
        res["prefetch"] = probe_prefetch()
    if "vision_kernel" in only:
        res["vision_kernel"] = probe_vision_kernel()
    if "few_rows" in only:
        res["few_rows"] = probe_few_rows(fused_top=args.fused_top, only_default=args.only_default,
                                         merge_sweep=args.merge_sweep)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
