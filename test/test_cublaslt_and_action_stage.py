"""cuBLASLt algorithm records (engine/cublaslt.py, graphs.lt_linear) and the action stage's fast-path pieces
(graphs.action_tokens, graphs.action_rope, flow.sample's Euler step).

Specification:
- cuBLASLt is only ever reached on CUDA: on the CPU every GEMM is the torch op, and the module says why it
  cannot run instead of failing somewhere inside ctypes. Stored algorithms are cuBLAS's 64-byte struct.
- A shipped record runs only where it is safe and pays: recorded with this cuBLASLt version, accepted by
  cublasLtMatmulAlgoCheck, faster than F.linear by graphs.LT_MARGIN. Where no record applies, the torch
  op runs (same function either way).
- The action stage's compiled in-proj and the RoPE tables gathered once per step compute what the eager
  modules compute.
"""

from __future__ import annotations

import json
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from flashdrive_ros.engine import cublaslt, graphs
from flashdrive_ros.engine.action_proj import ActionInProj
from flashdrive_ros.engine.config import tiny_config
from flashdrive_ros.engine.expert import Expert
from flashdrive_ros.engine.flow import FlowSchedule, sample
from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.rope import extend_positions, rope_index


# ----------------------------------------------------------------------------- engine/cublaslt.py

def test_heuristic_result_has_the_c_layout():
    """cublasLtMatmulHeuristicResult_t: algo (8 x uint64), size_t workspace, status, float waves, int[4]."""
    assert cublaslt.ctypes.sizeof(cublaslt._Algo) == 64
    assert cublaslt.ctypes.sizeof(cublaslt._Heuristic) == 96


def test_stored_algorithms_round_trip_and_wrong_lengths_are_refused():
    algo = cublaslt._Algo()
    for i in range(8):
        algo.data[i] = (i + 1) * 0x0101010101
    text = cublaslt._algo_hex(algo)
    assert len(text) == 128 and bytes(cublaslt._algo_from_hex(text)) == bytes(algo)
    with pytest.raises(ValueError, match="64 bytes"):
        cublaslt._algo_from_hex(text[:-2])


def test_a_plan_refuses_epilogues_and_dtypes_it_cannot_run():
    with pytest.raises(ValueError, match="epilogue"):
        cublaslt.Plan(8, 16, 32, epilogue="relu")
    with pytest.raises(ValueError, match="dtype"):
        cublaslt.Plan(8, 16, 32, dtype=torch.float64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message; this machine has CUDA")
def test_without_cuda_the_library_says_why_it_cannot_run():
    with pytest.raises(cublaslt.CublasLtError, match="needs CUDA"):
        cublaslt.library()


def test_lt_linear_is_never_consulted_for_cpu_tensors(monkeypatch):
    monkeypatch.setattr(graphs, "_load_lt_records", lambda device: pytest.fail("loaded records for a CPU tensor"))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert graphs.lt_linear(x, w, None, "none") is None
    torch.testing.assert_close(graphs.linear(x, w), torch.nn.functional.linear(x, w), rtol=0, atol=0)


# ------------------------------------------------------------------------- shipped records (graphs)

class _FakePlan:
    def __init__(self, m, n, k, epilogue, dtype, device):
        self.key = (m, n, k, epilogue)

    def supports(self, algo):
        return algo != "rejected"


def _fake_lt_module(version: int):
    return SimpleNamespace(version=lambda: version, Plan=_FakePlan)


def _lt_record(name, m, n, k, epilogue, lt_us, torch_us, algo="00" * 64):
    return dict(name=name, dtype="bfloat16", m=m, n=n, k=k, epilogue=epilogue, algo=algo, lt_us=lt_us,
                torch_us=torch_us)


@pytest.fixture
def fake_gpu_records(monkeypatch, tmp_path):
    """A records file for "Fake GPU" recorded with cuBLASLt 1234, read as the engine reads it."""
    records = [
        _lt_record("proj", 2880, 1152, 1152, "bias", 16.0, 18.7),                 # 0.86x: runs
        _lt_record("fc1", 2880, 4304, 1152, "gelu_bias", 49.4, 51.9),             # 0.95x: runs
        _lt_record("qkv", 2880, 3456, 1152, "bias", 39.28, 39.31),                # a tie: F.linear
        _lt_record("o", 64, 2048, 2048, "none", 5.0, 6.0, algo="rejected"),       # AlgoCheck says no
    ]
    (tmp_path / "cublaslt_fake_gpu.json").write_text(json.dumps(dict(gpu="Fake GPU", lt_version=1234,
                                                                     records=records)))
    monkeypatch.setattr(graphs, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(graphs, "_LT", {"loaded": set(), "use": {}})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return tmp_path


def _load_with(monkeypatch, module) -> None:
    import flashdrive_ros.engine as engine_pkg

    monkeypatch.setitem(sys.modules, "flashdrive_ros.engine.cublaslt", module)
    monkeypatch.setattr(engine_pkg, "cublaslt", module)
    graphs._load_lt_records(torch.device("cuda", 0))


def test_records_run_where_they_beat_f_linear_by_the_margin_and_the_library_accepts_them(monkeypatch,
                                                                                          fake_gpu_records):
    _load_with(monkeypatch, _fake_lt_module(1234))
    assert set(graphs._LT["use"]) == {(0, "bfloat16", 2880, 1152, 1152, "bias"),
                                      (0, "bfloat16", 2880, 4304, 1152, "gelu_bias")}
    assert graphs.lt_choices() == {"M2880 N1152 K1152 bias": "cublaslt", "M2880 N4304 K1152 gelu_bias": "cublaslt"}
    graphs._load_lt_records(torch.device("cuda", 0))  # once per device: a second call changes nothing
    assert len(graphs._LT["use"]) == 2


def test_records_of_another_cublaslt_version_are_not_used(monkeypatch, fake_gpu_records):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _load_with(monkeypatch, _fake_lt_module(9999))
    assert graphs._LT["use"] == {}
    assert any("1234" in str(w.message) and "9999" in str(w.message) for w in caught)


def test_dense_takes_a_record_when_one_applies_else_the_module(monkeypatch):
    lin = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    seen = []

    def fake_lt(x_, w, b, epilogue):
        seen.append(epilogue)
        return torch.full((3, 6), 7.0)

    monkeypatch.setattr(graphs, "lt_linear", fake_lt)
    assert torch.equal(graphs._dense(lin, x), torch.full((3, 6), 7.0)) and seen == ["bias"]
    monkeypatch.setattr(graphs, "lt_linear", lambda *a: None)
    torch.testing.assert_close(graphs._dense(lin, x), lin(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ action stage

def test_action_tokens_are_the_in_projection():
    torch.manual_seed(0)
    proj = ActionInProj(32, hidden_size=16, num_enc_layers=2).eval()
    x, t = torch.randn(2, 64, 2), torch.tensor([0.25, 0.5])
    torch.testing.assert_close(graphs.action_tokens(proj, x, t), proj(x, t), rtol=0, atol=0)


def test_rope_tables_given_once_equal_the_per_call_gather():
    cfg = tiny_config()
    ex = Expert(cfg.expert_text_config()).eval()
    graphs.fuse_projections(ex)
    t_len, n_ctx = cfg.action_space.n_waypoints, 40
    max_len = n_ctx + t_len + 8
    ids = torch.zeros(max_len - 30, dtype=torch.long)
    pos = extend_positions(rope_index(ids, torch.zeros(0, 3, dtype=torch.long), 7, 2)[0], max_len)
    caches = [StaticKVCache.for_config(cfg.text, 1, max_len, pos) for _ in range(2)]
    for c in caches:
        c.k.copy_(torch.linspace(-1, 1, c.k.numel()).reshape(c.k.shape))
        c.v.copy_(torch.linspace(1, -1, c.v.numel()).reshape(c.v.shape))
    emb = torch.randn(1, t_len, cfg.expert.hidden_size, generator=torch.Generator().manual_seed(1))
    act = torch.arange(n_ctx, n_ctx + t_len)
    limit = torch.tensor(n_ctx + t_len)
    per_call = graphs.expert_forward(ex, emb, caches[0], act, None, max_len, key_limit=limit)
    rope = graphs.action_rope(caches[1], act, emb.dtype)
    given = graphs.expert_forward(ex, emb, caches[1], act, None, max_len, key_limit=limit, rope=rope)
    torch.testing.assert_close(given, per_call, rtol=0, atol=0)
    # tables in another dtype than the tokens are not used: the gather runs again
    wrong = tuple(r.double() for r in rope)
    again = graphs.expert_forward(ex, emb, caches[1], act, None, max_len, key_limit=limit, rope=wrong)
    torch.testing.assert_close(again, per_call, rtol=0, atol=0)


def test_euler_steps_integrate_a_constant_velocity_exactly_enough():
    """x + dt * v per step (one add kernel): a constant velocity integrates to x0 + v."""
    x0 = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(3))
    v = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(4))
    out = sample(lambda x, t: v, x0, FlowSchedule.uniform(10))
    torch.testing.assert_close(out, x0 + v, rtol=1e-6, atol=1e-6)
