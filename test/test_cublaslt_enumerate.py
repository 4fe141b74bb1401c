"""Exhaustive cuBLASLt configurations (engine/cublaslt.py: config_combinations, config_variations,
Plan.capabilities, Plan.enumerate, Candidate.describe).

Specification:
- The configurations an algorithm's capabilities allow are each listed once, in a fixed order: every splitK 1
  configuration before any split-K one; within that, no swizzle / custom option / explicit cluster shape
  before one of them, before two, before three; within such a tier the algorithms take turns, each walking
  its tiles x stages in the library's order. Tile or stages id 0 (the library picks) is tried only where the
  capability lists nothing else. Split-K is tried only where supported, with each reduction scheme the mask
  allows; custom options 0 .. min(CUSTOM_OPTION_MAX, CUSTOM_OPTIONS_TRIED - 1); cluster shape AUTO first.
- Plan.enumerate returns the heuristic's candidates first, then the configurations cublasLtMatmulAlgoCheck
  accepts within the workspace, each 64-byte algorithm once, at most `limit` of them. An algorithm id or a
  configuration that fails is skipped and counted by reason; it raises only without CUDA or where nothing
  at all can be listed.
- describe() names algorithm, tile, stages, split-K (and its reduction), swizzle, custom option and cluster.
The cuBLASLt library is replaced by a ctypes-level fake here (the calls, sizes and size-0 queries as the
header specifies them); the real library is exercised by scripts/gpu_cublaslt_check.py on a GPU.
"""

from __future__ import annotations

import ctypes
import itertools
import time

import pytest
import torch

from flashdrive_ros.engine import cublaslt
from flashdrive_ros.engine.cublaslt import AlgoCaps, Candidate, Config

# ------------------------------------------------------------------------------- pure combinations


def _caps(algo_id, tiles=(24, 29), stages=(35,), split_k=False, mask=0, swizzle=False, custom_max=0):
    return AlgoCaps(algo_id, tuple(tiles), tuple(stages), split_k, mask, swizzle, custom_max)


def _extras_count(c: Config) -> int:
    return (c.swizzle != 0) + (c.custom != 0) + (c.cluster != cublaslt.CLUSTER_SHAPE_AUTO)


def test_every_allowed_configuration_is_listed_once():
    mask = cublaslt.REDUCTION_COMPUTE_TYPE | cublaslt.REDUCTION_OUTPUT_TYPE
    algos = [_caps(66, tiles=(24, 29, 165), stages=(35, 36), split_k=True, mask=mask, swizzle=True, custom_max=2),
             _caps(21, tiles=(18,), stages=(0,))]
    configs = list(cublaslt.config_combinations(algos, split_k_values=(2, 4), cluster_shapes=(2, 3)))
    assert len(configs) == len(set(configs))
    clusters = 3  # AUTO, 1x1x1, 2x1x1
    n66 = 3 * 2 * (2 * 3 * clusters) * (1 + 2 * 2)   # tiles x stages x extras x (splitK 1 + 2 values x 2 schemes)
    n21 = 1 * 1 * clusters
    assert len(configs) == n66 + n21
    assert {c.split_k for c in configs if c.algo_id == 21} == {1}
    assert {(c.split_k, c.reduction) for c in configs if c.split_k > 1} == {
        (2, cublaslt.REDUCTION_COMPUTE_TYPE), (2, cublaslt.REDUCTION_OUTPUT_TYPE),
        (4, cublaslt.REDUCTION_COMPUTE_TYPE), (4, cublaslt.REDUCTION_OUTPUT_TYPE)}
    assert all(c.reduction == cublaslt.REDUCTION_NONE for c in configs if c.split_k == 1)
    assert {c.custom for c in configs} == {0, 1, 2}


def test_splitk_1_comes_first_then_fewer_changes_and_the_algorithms_take_turns():
    algos = [_caps(66, tiles=(24, 29), split_k=True, mask=cublaslt.REDUCTION_INPLACE, swizzle=True, custom_max=1),
             _caps(7, tiles=(18, 20), stages=(4, 5))]
    configs = list(cublaslt.config_combinations(algos, cluster_shapes=(2,)))
    keys = [(c.split_k > 1, _extras_count(c)) for c in configs]
    assert keys == sorted(keys)  # splitK 1 tier first; within a tier, fewest changes first
    plain = [c for c in configs if keys[configs.index(c)] == (False, 0)]
    assert [c.algo_id for c in plain[:4]] == [66, 7, 66, 7]  # turns, in the order the algorithms were given
    assert [(c.tile, c.stages) for c in plain if c.algo_id == 7] == [(18, 4), (18, 5), (20, 4), (20, 5)]
    assert plain[0] == Config(66, 24, 35, 1, 0, 0, 0, 0)


def test_the_order_is_the_same_every_time_and_built_lazily():
    # 30 algorithms x 199 tiles x 49 stages x 2 swizzles x 16 custom options x 7 cluster shapes: ~65 million
    algos = [_caps(i, tiles=range(1, 200), stages=range(1, 50), swizzle=True, custom_max=15) for i in range(30)]
    start = time.monotonic()
    head = list(itertools.islice(cublaslt.config_combinations(algos), 1000))
    assert time.monotonic() - start < 2.0  # only what is taken is built
    assert head == list(itertools.islice(cublaslt.config_combinations(algos), 1000))
    assert len(set(head)) == 1000 and len({c.algo_id for c in head}) == 30


@pytest.mark.parametrize("listed, tried", [((), [0]), ((0,), [0]), ((0, 24, 0, 29, 24), [24, 29]), ((7, 3), [7, 3])])
def test_undefined_tile_and_stages_are_tried_only_when_nothing_else_is_listed(listed, tried):
    configs = list(cublaslt.config_combinations([_caps(1, tiles=listed, stages=listed)], cluster_shapes=()))
    assert [c.tile for c in configs if c.stages == tried[0]] == tried
    assert [c.stages for c in configs if c.tile == tried[0]] == tried


def test_split_k_needs_support_and_takes_its_reduction_schemes_from_the_mask():
    no_split = list(cublaslt.config_combinations([_caps(1, split_k=False, mask=7)], cluster_shapes=()))
    assert {c.split_k for c in no_split} == {1}
    unmasked = list(cublaslt.config_combinations([_caps(1, tiles=(5,), split_k=True, mask=0)], split_k_values=(1, 3),
                                                 cluster_shapes=()))
    assert [(c.split_k, c.reduction) for c in unmasked] == [(1, 0), (3, cublaslt.REDUCTION_NONE)]


def test_custom_options_are_capped():
    configs = list(cublaslt.config_combinations([_caps(1, tiles=(5,), custom_max=1000)], cluster_shapes=(),
                                                custom_options=4))
    assert [c.custom for c in configs] == [0, 1, 2, 3]
    none = list(cublaslt.config_combinations([_caps(1, tiles=(5,), custom_max=-1)], cluster_shapes=()))
    assert [c.custom for c in none] == [0]


def test_cluster_shapes_start_with_auto_and_use_the_header_values():
    configs = list(cublaslt.config_combinations([_caps(1, tiles=(5,))]))
    assert [c.cluster for c in configs] == [0, 2, 3, 5, 6, 4, 8]
    assert cublaslt.CLUSTER_SHAPE_NAMES[3] == "2x1x1" and cublaslt.CLUSTER_SHAPE_NAMES[5] == "1x2x1"


def test_variations_keep_the_kernel_and_change_the_rest_nearest_first():
    caps = _caps(66, tiles=(24, 29), split_k=True, mask=cublaslt.REDUCTION_COMPUTE_TYPE, swizzle=True, custom_max=1)
    base = Config(66, 29, 35, 1, 0, 1, 0, 3)  # swizzled, cluster 2x1x1

    def changes(c):
        return (c.swizzle != 1) + (c.custom != 0) + (c.cluster != 3) + (c.split_k != 1)

    out = cublaslt.config_variations(base, caps, split_k_values=(2,), cluster_shapes=(2, 3))
    assert base not in out and len(out) == len(set(out))
    assert {(c.algo_id, c.tile, c.stages) for c in out} == {(66, 29, 35)}
    assert len(out) == 2 * 2 * 3 * 2 - 1  # swizzle x custom x cluster x (splitK 1, splitK 2) minus base
    assert [changes(c) for c in out] == sorted(changes(c) for c in out)
    # one change each: splitK 1 first, and among those, fewer attributes away from the defaults first
    assert out[:5] == [Config(66, 29, 35, 1, 0, 0, 0, 3), Config(66, 29, 35, 1, 0, 1, 0, 0),
                       Config(66, 29, 35, 1, 0, 1, 0, 2), Config(66, 29, 35, 1, 0, 1, 1, 3),
                       Config(66, 29, 35, 2, cublaslt.REDUCTION_COMPUTE_TYPE, 1, 0, 3)]


def test_retilings_keep_everything_but_tile_and_stages():
    caps = _caps(66, tiles=(0, 24, 29), stages=(35, 36))
    base = Config(66, 29, 35, 2, cublaslt.REDUCTION_COMPUTE_TYPE, 1, 3, 5)
    out = cublaslt.config_retilings(base, caps)
    assert [(c.tile, c.stages) for c in out] == [(24, 35), (24, 36), (29, 36)]
    assert all(c._replace(tile=29, stages=35) == base for c in out)


# ------------------------------------------------------------------------------------- describe()

def test_describe_names_every_configuration_attribute():
    c = Candidate(rank=12, algo_hex="00" * 64, workspace=0, waves=1.5, algo_id=66, tile_id=29, split_k=3,
                  stages_id=35, reduction=cublaslt.REDUCTION_COMPUTE_TYPE, swizzle=1, custom=2, cluster=3,
                  source="enumerated")
    assert c.describe() == ("#e12 algo 66 tile 29 stages 35 splitK 3 (compute) swizzle 1 custom 2 cluster 2x1x1 "
                            "waves 1.50")
    h = Candidate(3, "00" * 64, 0, 0.87, 66, 24, 1, stages_id=35, reduction=0, swizzle=0, custom=0, cluster=0)
    assert h.describe() == "#3 algo 66 tile 24 stages 35 splitK 1 swizzle 0 custom 0 cluster auto waves 0.87"
    assert h.config == Config(66, 24, 35, 1, 0, 0, 0, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message; this machine has CUDA")
def test_enumerate_without_cuda_says_why():
    plan = object.__new__(cublaslt.Plan)  # nothing set up: enumerate must refuse before touching it
    with pytest.raises(cublaslt.CublasLtError, match="needs CUDA"):
        plan.enumerate()


# ------------------------------------------------------------------------ enumerate with a fake library

# the fake's algorithm: data[0..7] = id, tile, stages, splitK, reduction, swizzle, custom, cluster
_SLOTS = {cublaslt.ALGO_CONFIG_ID: 0, cublaslt.ALGO_CONFIG_TILE_ID: 1, cublaslt.ALGO_CONFIG_STAGES_ID: 2,
          cublaslt.ALGO_CONFIG_SPLITK_NUM: 3, cublaslt.ALGO_CONFIG_REDUCTION_SCHEME: 4,
          cublaslt.ALGO_CONFIG_CTA_SWIZZLING: 5, cublaslt.ALGO_CONFIG_CUSTOM_OPTION: 6,
          cublaslt.ALGO_CONFIG_CLUSTER_SHAPE_ID: 7}
NOT_SUPPORTED, INVALID_VALUE = 15, 7


def _obj(ref):
    return ref._obj if hasattr(ref, "_obj") else ref


class FakeLt:
    """cuBLASLt as far as Plan needs it. Algorithm 66 has tiles 24 and 29, stages 35 (and 0), split-K with
    the compute-type reduction, swizzling, custom options 0..1; AlgoCheck refuses tile 29 with custom 1 and
    asks for 64 MiB of workspace at splitK 4. Algorithm 9: tile 18 only, no options. Algorithm 13: its
    initialization fails. Cluster shapes: AUTO and 2x1x1 on algorithm 66 only."""

    def __init__(self, ids=(66, 13, 9), heuristic=((66, 24, 35, 1, 0, 0, 0, 0),), get_ids_status=0,
                 heuristic_status=0):
        self.ids, self.heuristic = ids, heuristic
        self.get_ids_status, self.heuristic_status = get_ids_status, heuristic_status
        self.size_queries = []
        self.checks = 0

    def __getattr__(self, name):  # descriptors, preferences, handles: accepted
        if name.startswith("cublasLt"):
            return lambda *args: 0
        raise AttributeError(name)

    def cublasLtGetVersion(self):
        return 130100

    def cublasLtMatmulAlgoGetHeuristic(self, handle, desc, a, b, c, d, pref, count, results, returned):
        if self.heuristic_status:
            return self.heuristic_status
        for i, fields in enumerate(self.heuristic[:count]):
            for slot, v in enumerate(fields):
                results[i].algo.data[slot] = v
            results[i].workspace_size, results[i].state, results[i].waves = 0, 0, 1.0
        _obj(returned).value = min(count, len(self.heuristic))
        return 0

    def cublasLtMatmulAlgoGetIds(self, handle, compute, scale, at, bt, ct, dt, requested, ids, returned):
        if self.get_ids_status:
            return self.get_ids_status
        for i, v in enumerate(self.ids[:requested]):
            ids[i] = v
        _obj(returned).value = min(requested, len(self.ids))
        return 0

    def cublasLtMatmulAlgoInit(self, handle, compute, scale, at, bt, ct, dt, algo_id, algo):
        if algo_id == 13:
            return NOT_SUPPORTED
        a = _obj(algo)
        for slot, v in enumerate((algo_id, 0, 0, 1, 0, 0, 0, 0)):
            a.data[slot] = v
        return 0

    def cublasLtMatmulAlgoCapGetAttribute(self, algo, attr, buf, size, written):
        algo_id = _obj(algo).data[0]
        arrays = {cublaslt.ALGO_CAP_TILE_IDS: {66: [24, 0, 29], 9: [18]},
                  cublaslt.ALGO_CAP_STAGES_IDS: {66: [0, 35], 9: []}}
        if attr in arrays:
            values = arrays[attr][algo_id]
            if size == 0:  # the size query: bytes needed
                self.size_queries.append(attr)
                _obj(written).value = 4 * len(values)
                return 0
            if size != 4 * len(values):
                return INVALID_VALUE
            for i, v in enumerate(values):
                buf[i] = v
            _obj(written).value = size
            return 0
        scalars = {cublaslt.ALGO_CAP_SPLITK_SUPPORT: {66: 1, 9: 0},
                   cublaslt.ALGO_CAP_REDUCTION_SCHEME_MASK: {66: cublaslt.REDUCTION_COMPUTE_TYPE, 9: 0},
                   cublaslt.ALGO_CAP_CTA_SWIZZLING_SUPPORT: {66: 1, 9: 0},
                   cublaslt.ALGO_CAP_CUSTOM_OPTION_MAX: {66: 1, 9: 0}}
        if attr not in scalars or size != 4:
            return INVALID_VALUE
        _obj(buf).value = scalars[attr][algo_id]
        _obj(written).value = 4
        return 0

    def cublasLtMatmulAlgoConfigSetAttribute(self, algo, attr, buf, size):
        if size != (2 if attr == cublaslt.ALGO_CONFIG_CLUSTER_SHAPE_ID else 4):
            return INVALID_VALUE
        _obj(algo).data[_SLOTS[attr]] = _obj(buf).value
        return 0

    def cublasLtMatmulAlgoConfigGetAttribute(self, algo, attr, buf, size, written):
        if size != (2 if attr == cublaslt.ALGO_CONFIG_CLUSTER_SHAPE_ID else 4):
            return INVALID_VALUE
        _obj(buf).value = _obj(algo).data[_SLOTS[attr]] & 0xFFFFFFFF
        return 0

    def cublasLtMatmulAlgoCheck(self, handle, desc, a, b, c, d, algo, result):
        self.checks += 1
        algo_id, tile, stages, split_k, reduction, swizzle, custom, cluster = list(_obj(algo).data)
        algo_id &= 0xFFFFFFFF
        ok = {66: tile in (24, 29) and stages == 35 and cluster in (0, 3) and not (tile == 29 and custom == 1)
              and (split_k == 1) == (reduction == 0),
              9: tile == 18 and stages == 0 and split_k == 1 and cluster == 0 and swizzle == 0 and custom == 0}
        if not ok.get(algo_id, False):
            return NOT_SUPPORTED
        r = _obj(result)
        r.workspace_size = 64 * 2 ** 20 if split_k == 4 else 0
        r.waves = 1.0
        return 0


@pytest.fixture
def fake_lt(monkeypatch):
    def install(**kwargs):
        lib = FakeLt(**kwargs)
        monkeypatch.setattr(cublaslt, "_STATE", {"lib": lib, "handles": {0: ctypes.c_void_p(1)}, "workspaces": {}})
        return lib
    return install


def _configs(candidates):
    return [c.config for c in candidates]


def test_enumerate_gives_the_heuristic_then_what_algocheck_accepts_each_once(fake_lt):
    lib = fake_lt()
    plan = cublaslt.Plan(2880, 1152, 1152, "bias")
    out = plan.enumerate()
    assert out[0].source == "heuristic" and out[0].config == Config(66, 24, 35, 1, 0, 0, 0, 0)
    enumerated = [c for c in out if c.source == "enumerated"]
    assert [c.rank for c in enumerated] == list(range(len(enumerated)))
    assert len({c.algo_hex for c in out}) == len(out)
    configs = _configs(enumerated)
    # algorithm 66: tiles 24, 29 x stages 35 x swizzle 0/1 x custom 0/1 x cluster AUTO/2x1x1, less tile 29 with
    # custom 1, less the heuristic's own; + splitK 2 and 3 (4 needs 64 MiB) with the compute-type reduction
    n66_plain = 2 * 2 * 2 * 2 - 4 - 1
    assert sum(1 for c in configs if c.algo_id == 66 and c.split_k == 1) == n66_plain
    assert {c.split_k for c in configs} == {1, 2, 3}
    assert all(c.reduction == cublaslt.REDUCTION_COMPUTE_TYPE for c in configs if c.split_k > 1)
    # the algorithms take turns (the heuristic's 66 first; its 24/35 was the heuristic's own, so 9 leads)
    assert configs[:2] == [Config(9, 18, 0, 1, 0, 0, 0, 0), Config(66, 29, 35, 1, 0, 0, 0, 0)]
    assert lib.size_queries == [cublaslt.ALGO_CAP_TILE_IDS, cublaslt.ALGO_CAP_STAGES_IDS] * 2
    report = plan.enumeration_report
    assert report["algo_ids"] == 2 and report["duplicates"] == 1 and report["enumerated"] == len(enumerated)
    assert report["skipped"]["algo id skipped: cublasLtMatmulAlgoInit failed with cublasStatus 15"] == 1
    assert report["skipped"]["needs more workspace than WORKSPACE_BYTES"] > 0
    assert enumerated[0].describe() == ("#e0 algo 9 tile 18 stages 0 splitK 1 swizzle 0 custom 0 cluster auto "
                                        "waves 1.00")


def test_enumerate_honours_limit_and_max_checks(fake_lt):
    lib = fake_lt()
    plan = cublaslt.Plan(2880, 1152, 1152, "bias")
    out = plan.enumerate(limit=3)
    assert sum(c.source == "enumerated" for c in out) == 3 and plan.enumeration_report["stopped"] == "limit"
    assert all(c.split_k == 1 for c in out)  # the first of them: splitK 1
    lib.checks = 0
    plan.enumerate(max_checks=5)
    assert lib.checks == 5 and plan.enumeration_report["stopped"] == "max_checks"


def test_enumerate_takes_given_configurations_and_counts_refusals(fake_lt):
    fake_lt()
    plan = cublaslt.Plan(2880, 1152, 1152, "bias")
    caps = plan.capabilities()
    assert caps[66] == AlgoCaps(66, (24, 0, 29), (0, 35), True, cublaslt.REDUCTION_COMPUTE_TYPE, True, 1)
    base = Config(66, 29, 35, 1, 0, 0, 0, 0)
    out = plan.enumerate(None, cublaslt.config_variations(base, caps[66]), include_heuristic=False)
    assert all(c.source == "enumerated" and (c.algo_id, c.tile_id, c.stages_id) == (66, 29, 35) for c in out)
    assert all(c.custom == 0 for c in out)  # tile 29 with custom 1: refused
    assert plan.enumeration_report["skipped"]["cublasLtMatmulAlgoCheck failed with cublasStatus 15"] > 0
    again = plan.enumerate(2, cublaslt.config_variations(base, caps[66]), include_heuristic=False,
                           exclude={out[0].algo_hex})  # what an earlier call gave does not count again
    assert [c.config for c in again] == [c.config for c in out[1:3]]
    assert plan.enumeration_report["duplicates"] == 1
    out2 = plan.enumerate(None, [Config(13, 1, 1, 1, 0, 0, 0, 0)], include_heuristic=False)
    assert out2 == [] and plan.enumeration_report["skipped"] == {
        "algo id skipped: cublasLtMatmulAlgoInit failed with cublasStatus 15": 1,
        "no base algorithm for the id": 1}


def test_enumerate_builds_on_given_bytes_and_keeps_what_no_attribute_sets(fake_lt):
    hidden = 0x5A << 32  # in the fake: a field of the heuristic's algorithm no configuration attribute reaches
    fake_lt(heuristic=((66 | hidden, 24, 35, 1, 0, 1, 0, 3),))
    plan = cublaslt.Plan(2880, 1152, 1152, "bias")
    (h,) = plan.candidates(1)
    out = plan.enumerate(None, cublaslt.config_retilings(h.config, plan.capabilities()[66]), include_heuristic=False,
                         base_hex=h.algo_hex)
    assert [c.config for c in out] == [Config(66, 29, 35, 1, 0, 1, 0, 3)]
    assert out[0].algo_hex[8:16] == h.algo_hex[8:16] == "5a000000"  # kept from the base's bytes
    assert all(c.algo_hex[8:16] == "00000000" for c in plan.enumerate(4, include_heuristic=False))  # AlgoInit's
    assert plan.enumerate(None, [Config(9, 18, 0, 1, 0, 0, 0, 0)], include_heuristic=False, base_hex=h.algo_hex) == []


def test_enumerate_fails_softly_and_raises_only_when_nothing_works(fake_lt):
    fake_lt(get_ids_status=NOT_SUPPORTED)  # no ids: the heuristic's candidates still come back
    out = cublaslt.Plan(64, 2048, 2048).enumerate()
    assert [c.source for c in out] == ["heuristic"]
    fake_lt(heuristic_status=NOT_SUPPORTED)  # no heuristic: the enumerated ones do
    out = cublaslt.Plan(64, 2048, 2048).enumerate(limit=4)
    assert len(out) == 4 and all(c.source == "enumerated" for c in out)
    fake_lt(get_ids_status=NOT_SUPPORTED, heuristic_status=NOT_SUPPORTED)
    with pytest.raises(cublaslt.CublasLtError, match="no cuBLASLt algorithm"):
        cublaslt.Plan(64, 2048, 2048).enumerate()


def test_candidates_read_every_attribute_with_its_size(fake_lt):
    fake_lt(heuristic=((66, 29, 35, 2, cublaslt.REDUCTION_COMPUTE_TYPE, 1, 1, 3),))
    (c,) = cublaslt.Plan(64, 2048, 2048).candidates(4)
    assert c.config == Config(66, 29, 35, 2, cublaslt.REDUCTION_COMPUTE_TYPE, 1, 1, 3)
    assert c.describe().startswith("#0 algo 66 tile 29 stages 35 splitK 2 (compute) swizzle 1 custom 1 cluster 2x1x1")
