"""A/B of engine switches on the full-shape benchmark row (issue 7, session 5).

    python scripts/gpu_ab.py [--variants defaults,prefetch2,...] [--rounds 2] [--steps 10] [--shape full]
                             [--out ab.json]

Variants (VARIANTS below) are changes against the engine's defaults: "session4" is the launch code as session 4
left it (PDL without the prefetch, the late launch trigger, the 5 % shipping margin; with this session's
records), "no_pdl" has no programmatic dependent launch, "records=PATH" runs the GEMM records of another file,
the others change one switch each.

Builds the benchmark's OursPipeline once (random weights, timing only) and times the row "ours: all (τ=5.6)"
under each variant: the variant's module switches are set, every CUDA graph is captured again (the switches are
compile-time constants of the kernels), the window is prefilled, then `steps` steps are timed after 2 warm-up
steps. The variants run in interleaved rounds (A B C A B C ...), so drift of the GPU shows as a spread between
rounds, not as a difference between variants. Per variant: median per stage over all of its steps, and whether
its last trajectory (and its drafted tokens' agreement count) are bitwise those of the first variant (a pure
scheduling switch such as the prefetch must not change a bit; a GEMM route change may change roundings).
--shape tiny runs the script itself on the CPU (no CUDA: the route and records variants need a GPU).
"""
import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.bench.ours import Mode, OursPipeline  # noqa: E402
from flashdrive_ros.bench.shapes import get_shape  # noqa: E402
from flashdrive_ros.bench.timing import Clock  # noqa: E402
from flashdrive_ros.engine import attention_kernel as A  # noqa: E402
from flashdrive_ros.engine import graphs as G  # noqa: E402
from flashdrive_ros.engine import linear_kernel as LK  # noqa: E402

STAGES = ("encode", "prefill", "decode", "action", "total")
# Kernel-route counters: calls of these functions while a variant builds and runs (its graphs are captured
# again, so a route its switches turn on or off shows up here; replays do not call Python).
COUNTED = (("norm_kernels", "add_rms_norm"), ("linear_kernel", "skinny_linear"), ("linear_kernel", "skinny_swiglu"))
CALLS: dict = {}
ACTION_TOKENS = G.action_tokens


def _count_calls() -> None:
    import importlib

    for mod_name, fn_name in COUNTED:
        mod = importlib.import_module(f"flashdrive_ros.engine.{mod_name}")
        real = getattr(mod, fn_name)

        def counted(*a, _real=real, _name=fn_name, **kw):
            out = _real(*a, **kw)
            key = _name if out is not None else f"{_name} (None)"
            CALLS[key] = CALLS.get(key, 0) + 1
            return out

        setattr(mod, fn_name, counted)

    real_tma = A.tma_applies

    def tma_counted(*a, **kw):  # which attention kernel each captured call runs
        out = real_tma(*a, **kw)
        key = f"attention {'tma' if out else 'pointer'} splits>1" if a[0].splits > 1 else \
            f"attention {'tma' if out else 'pointer'} no split"
        CALLS[key] = CALLS.get(key, 0) + 1
        return out

    A.tma_applies = tma_counted
MODE = Mode(streaming=True, tau=5.6, flow="adaptive", graphs=True)


def _route(names: tuple[str, ...], skinny: bool):
    """Run the shipped records named `names` on the Triton kernel (skinny) or on cuBLAS, whatever their
    times say."""
    def apply():
        dev = torch.cuda.current_device()
        records = json.loads(G.tuned_linear_file(torch.cuda.get_device_name()).read_text())["records"]
        keys = {LK.record_key(dict(r, device=dev)) for r in records if r["name"] in names}
        G._SHIPPED["use"] = G._SHIPPED["use"] | keys if skinny else G._SHIPPED["use"] - keys
    return apply


def _no_host_reads():
    """The benchmark's verify loop without its per-pass host read: as many verify + draft passes as the last
    run of the loop took are enqueued back to back, and the counter is read once at the end. Not a valid
    decoder (it must know when to stop); it measures what the per-pass read costs."""
    def apply():
        from flashdrive_ros.bench import ours as O

        real = O.OursPipeline._verify_graphed

        def blind(self, tok, tau):
            if not hasattr(self, "_blind_passes"):
                self._blind_passes = real(self, tok, tau)[0]
            ver, dra = self._verify_graph(), self._draft_graph()
            sched = O.accept_schedule(self.n_dec, tau)
            if self._sched_host.get("tau") != tau:
                ver.buffers["sched"][:len(sched)].copy_(torch.tensor(sched))
                self._sched_host = {"tau": tau}
            ver.buffers["anchor"].copy_(tok)
            ver.buffers["state"].copy_(self._state0, non_blocking=True)
            for _ in range(self._blind_passes):
                ver()
                dra()
            return self._blind_passes, int(ver.buffers["state"][3])

        O.OursPipeline._verify_graphed = blind
        RESTORE.append(lambda: setattr(O.OursPipeline, "_verify_graphed", real))
    return apply


RESTORE: list = []  # undo actions of the variant that ran last


def _reload_records(path: Path | None) -> None:
    """Forget every tuned GEMM config and shipping choice, then load the records at path (None: the
    engine's own file for this GPU) as the engine does."""
    real = G.tuned_linear_file
    if path is not None:
        G.tuned_linear_file = lambda gpu_name: path
    try:
        LK.clear_tuned()
        G._SHIPPED.update(loaded=set(), use=set())
        G._load_shipped_tuning(LK, torch.device("cuda", torch.cuda.current_device()))
    finally:
        G.tuned_linear_file = real


def _records(path: str):
    """Run with the shipped GEMM records of another file (e.g. an earlier session's)."""
    def apply():
        _reload_records(Path(path))
        RESTORE.append(lambda: _reload_records(None))
    return apply


def _set(module, **values):
    def apply():
        for k, v in values.items():
            setattr(module, k, v)
    return apply


def _switch(table: dict, key: str, value):
    """table[key] = value for this variant (a dict of switches such as graphs.FUSED_DOWN_NORM), then restored."""
    def apply():
        old = table[key]
        table[key] = value
        RESTORE.append(lambda: table.__setitem__(key, old))
    return apply


def _pdl(linear_tiles: int, attention_blocks: int, early: bool = False):
    """The weight / K-V prefetch before each wait, and where the kernels let their successor launch."""
    return [_set(LK, PREFETCH_TILES=linear_tiles, TRIGGER_EARLY=early),
            _set(A, PREFETCH_BLOCKS=attention_blocks, TRIGGER_EARLY=early)]


# Every switch a variant may touch, restored to its default before each variant.
SWITCHES = [(LK, "PREFETCH_TILES"), (LK, "TRIGGER_EARLY"), (A, "PREFETCH_BLOCKS"), (A, "TRIGGER_EARLY"),
            (A, "FUSED_MERGE"), (A, "PROGRAMS_PER_SM"), (A, "FEW_ROWS"), (A, "FEW_ROWS_TALL"), (A, "PDL")]
LM_QKV = ("lm qkv M=8", "lm qkv M=1")  # kernel within 5 % of cuBLAS alone: shipped with PDL since session 5
LM_SWIGLU = ("lm gate|up+swiglu M=8", "lm gate|up+swiglu M=1")  # likewise
EXPERT_CUBLAS = ("expert qkv", "expert o", "expert down")  # the records where cuBLAS was faster alone
VARIANTS = {
    "defaults": [],
    # PDL without prefetch, late trigger, the 5 % margin (LM q|k|v and gate|up + SwiGLU back on their cuBLAS paths)
    "session4": _pdl(0, 0) + [_route(LM_QKV + LM_SWIGLU, skinny=False)],
    "no_pdl": [_set(A, PDL=False), _route(LM_QKV, skinny=False)],
    "prefetch0": _pdl(0, 0, True),
    "prefetch2": _pdl(2, 2, True),
    "late_trigger": _pdl(1, 1, False),
    "lm_qkv_cublas": [_route(LM_QKV, skinny=False)],
    "expert_skinny": [_route(EXPERT_CUBLAS, skinny=True)],
    "expert_down_skinny": [_route(("expert down",), skinny=True)],
    "fused_merge": [_set(A, FUSED_MERGE=True)],
    "attention_2_per_sm": [_set(A, PROGRAMS_PER_SM=2)],
    "verify_attention_bm32": [_set(A, FEW_ROWS=A.Config(block_m=32, block_n=64, num_warps=4, num_stages=3))],
    "action_attention_bm32": [_set(A, FEW_ROWS_TALL=A.Config(block_m=32, block_n=64, num_warps=4, num_stages=3))],
    "fused_layers": [lambda: G.set_fused_layers(True)],
    "no_host_reads": [_no_host_reads()],
    "records_session4": [_records("docs/bench/linear_records_session4_h100.json")],
    "action_attention_bm128_w8": [_set(A, FEW_ROWS_TALL=A.Config(block_m=128, block_n=64, num_warps=8, num_stages=3))],
    "action_attention_bm128_w8_bn32": [_set(A, FEW_ROWS_TALL=A.Config(block_m=128, block_n=32, num_warps=8,
                                                                      num_stages=4))],
    "action_attention_bm64_w8": [_set(A, FEW_ROWS_TALL=A.Config(block_m=64, block_n=64, num_warps=8, num_stages=3))],
    "action_attention_bn128": [_set(A, FEW_ROWS_TALL=A.Config(block_m=64, block_n=128, num_warps=8, num_stages=3))],
    "attention_prefetch4": [_set(A, PREFETCH_BLOCKS=4)],
    "linear_prefetch0": [_set(LK, PREFETCH_TILES=0)],
    "no_cublaslt": [_switch(G._LT, "use", {})],
    "action_in_proj_eager": [_set(G, action_tokens=lambda in_proj, x, t: in_proj(x, t))],
    # session 10: the few-rows (split) attention through TMA descriptors
    "few_rows_tma": [_set(A, FEW_ROWS=replace(A.FEW_ROWS, tma=True), FEW_ROWS_TALL=replace(A.FEW_ROWS_TALL, tma=True))],
    "verify_tma": [_set(A, FEW_ROWS=replace(A.FEW_ROWS, tma=True))],
    "action_tma": [_set(A, FEW_ROWS_TALL=replace(A.FEW_ROWS_TALL, tma=True))],
    "action_tma_bm128_w8": [_set(A, FEW_ROWS_TALL=A.Config(block_m=128, block_n=64, num_warps=8, num_stages=3,
                                                         tma=True))],
    "few_rows_tma_st4": [_set(A, FEW_ROWS=replace(A.FEW_ROWS, tma=True, num_stages=4),
                              FEW_ROWS_TALL=replace(A.FEW_ROWS_TALL, tma=True))],
    "few_rows_tma_2_per_sm": [_set(A, PROGRAMS_PER_SM=2, FEW_ROWS=replace(A.FEW_ROWS, tma=True),
                                   FEW_ROWS_TALL=replace(A.FEW_ROWS_TALL, tma=True))],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="defaults,session4,prefetch0,prefetch2,late_trigger,lm_qkv_cublas")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shape", default="full", help="tiny: a CPU smoke test of the script itself")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = args.variants.split(",")
    for n in names:  # "records=PATH": the shipped GEMM records of another file
        if n.startswith("records="):
            VARIANTS[n] = [_records(n.split("=", 1)[1])]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ours = OursPipeline(get_shape(args.shape), device, torch.bfloat16 if cuda else torch.float32)
    ours.reference_tokens()  # the scripted drafter's token script (as bench.cli.run)
    clock = Clock(device)
    if cuda:  # the shipped records' choices, loaded now so that every variant starts from them
        G._load_shipped_tuning(LK, device)
        G._load_lt_records(device)
    shipped_use = set(G._SHIPPED["use"])
    res = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "shape": args.shape,
           "mode": MODE.label(), "steps_per_round": args.steps, "variants": {}}
    first = None
    _count_calls()
    defaults = {(m, a): getattr(m, a) for m, a in SWITCHES}
    for rnd in range(args.rounds):
        for name in names:
            G.action_tokens = ACTION_TOKENS
            for (m, a), v in defaults.items():
                setattr(m, a, v)
            while RESTORE:
                RESTORE.pop()()
            G.set_fused_layers(False)
            G._SHIPPED["use"] = set(shipped_use)
            for apply in VARIANTS[name]:
                apply()
            ours._g.clear()
            ours._sched_host = {}  # the new verify graph needs its schedule buffer filled
            if cuda:
                torch.cuda.empty_cache()
            v = res["variants"].setdefault(name, {"steps": []})
            CALLS.clear()
            try:
                ours.full_prefill_window()
                for _ in range(2):
                    ours.step(MODE, clock)
                steps = [ours.step(MODE, clock) for _ in range(args.steps)]
            except Exception as e:  # one broken variant must not cost the others
                v["error"] = f"{type(e).__name__}: {e}"
                print(f"round {rnd} {name}: failed: {v['error']}", flush=True)
                continue
            v["steps"] += [{s: st[s] for s in STAGES} for st in steps]
            out = (steps[-1].get("script_agree"), ours.last_action.clone())
            if first is None:
                first = out
            v["bitwise_equal_to_first"] = bool(out[0] == first[0] and torch.equal(out[1], first[1]))
            v["calls"] = dict(CALLS)
            med = {s: statistics.median(st[s] for st in steps) for s in STAGES}
            print(f"round {rnd} {name:28s} " + "  ".join(f"{s} {med[s]:6.2f}" for s in STAGES)
                  + f"  equal to first: {v['bitwise_equal_to_first']}  calls {v['calls']}", flush=True)
    print(f"\n{res['gpu']}, {res['torch']}; row '{res['mode']}', median ms over {args.rounds} x {args.steps} steps")
    print("| variant | " + " | ".join(STAGES) + " | bitwise = first |")
    print("|---|" + "---:|" * len(STAGES) + "---|")
    for name, v in res["variants"].items():
        if not v["steps"]:
            print(f"| {name} | failed: {v.get('error')} |")
            continue
        v["median"] = {s: round(statistics.median(st[s] for st in v["steps"]), 3) for s in STAGES}
        print(f"| {name} | " + " | ".join(f"{v['median'][s]:.2f}" for s in STAGES) + f" | {v['bitwise_equal_to_first']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
