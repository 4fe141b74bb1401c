"""Graphed greedy speculative decoding (cuda_graphs=True, speculative=True: draft / verify / tail StageGraphs,
loop state on the device) against the eager speculative loop and against plain greedy decoding.

On the CPU StageGraph runs the same stage functions eagerly on its static buffers, so this exercises the
code that is captured on CUDA (minus the capture). Engine-level runs use the shipped trained tiny checkpoint
and its DFlash drafter (assets/tiny, assets/tiny_dflash); loop-level runs drive GraphedStages directly with
an oracle drafter (as test_spec_lossless.py) so full, partial and empty acceptances, <|cot_end|> inside an
accepted span and the budget running out inside a block all happen.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.graphed import GraphedStages
from flashdrive_ros.engine.preprocess import tokens_per_image
from flashdrive_ros.engine.speculative import (Drafter, closed_in_block, context_features, greedy_accept, place_closing,
                                               speculative_decode)
from test_spec_lossless import PROMPT_LEN, OracleDrafter, autoregressive, build_target, prefill

torch.set_num_threads(2)

H = W = 128
T0, STRIDE = 1_700_000, 100_000
MAX_NEW = 24
# window offsets in strides: k = 1 continuations, a dropped window (k = 2), then k = 1 again
SCHEDULE = (0, 1, 2, 4, 5)


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (4, max(SCHEDULE) + 5, H, W, 3), dtype=np.uint8)


def window(clip, t, frames=None):
    xyz = np.zeros((16, 3))
    xyz[:, 0] = np.linspace(-11.0 - 0.25 * t, 0.0, 16)
    xyz[:, 1] = 0.01 * np.arange(-15, 1)
    f = np.ascontiguousarray((clip if frames is None else frames)[:, t:t + 4])
    return f, T0 + t * STRIDE, xyz, np.tile(np.eye(3), (16, 1, 1))


def engine(graphs, speculative=True, **kw):
    kw.setdefault("max_new_tokens", MAX_NEW)
    return DriveEngine.from_pretrained("tiny", cuda_graphs=graphs, speculative=speculative, streaming=True,
                                       flow_schedule="adaptive", **kw)


def stages(eng):
    return {key[0] for key in eng._fast.graphs}


# ------------------------------------------------------------------------------------------- engine level
def test_graphed_speculative_equals_eager_speculative_and_greedy(clip):
    fast, slow, plain = engine(True), engine(False), engine(False, speculative=False)
    assert fast._fast is not None and slow._fast is None
    assert "tiny_dflash" in fast.weights_description  # the shipped trained drafter
    stopped, multi = 0, 0
    for t in SCHEDULE:
        reads = fast._fast.host_reads
        a, b, c = fast.step(*window(clip, t)), slow.step(*window(clip, t)), plain.step(*window(clip, t))
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.reasoning == b.reasoning == c.reasoning
        assert a.num_tokens == b.num_tokens == c.num_tokens
        assert a.full_prefill == b.full_prefill == (t == 0)
        assert a.verify_passes == b.verify_passes and a.tokens_per_pass == b.tokens_per_pass
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.rot, b.rot, rtol=1e-4, atol=1e-4)
        # one device->host read per verify pass (a window whose first token ends it: one read)
        assert fast._fast.host_reads - reads == max(a.verify_passes, 1)
        stopped += a.num_tokens < MAX_NEW
        multi += a.tokens_per_pass > 1.0
    assert stopped >= 1 and multi >= 1  # <|cot_end|> ended some windows; some passes accepted drafts
    assert {"draft", "verify", "tail"} <= stages(fast) and "decode" not in stages(fast)
    built = fast._fast.builds
    fast.step(*window(clip, max(SCHEDULE) + 1))  # another k = 1 window: every graph is reused
    assert fast._fast.builds == built


def test_graphs_rebuilt_with_the_cache_kept_on_reset(clip):
    fast, slow = engine(True, max_new_tokens=10), engine(False, max_new_tokens=10)
    rng = np.random.default_rng(5)
    wide = rng.integers(0, 256, (4, 8, H, 2 * W, 3), dtype=np.uint8)
    assert tokens_per_image(H, 2 * W, fast.cfg.min_pixels, fast.cfg.max_pixels) != \
        tokens_per_image(H, W, fast.cfg.min_pixels, fast.cfg.max_pixels)

    def check(t, frames=None):
        a, b = fast.step(*window(clip, t, frames)), slow.step(*window(clip, t, frames))
        assert a.token_ids == b.token_ids and a.verify_passes == b.verify_passes
        assert a.tokens_per_pass == b.tokens_per_pass and a.full_prefill == b.full_prefill
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-4, atol=1e-4)
        return a

    check(0)
    check(1)
    verify = {k: g for k, g in fast._fast.graphs.items() if k[0] == "verify"}
    assert len(verify) == 1 and len(fast._fast._spec) == 1
    built = fast._fast.builds
    fast.reset()
    slow.reset()
    assert check(2).full_prefill  # reset: full prefill of the same length, same cache -> graphs kept
    assert fast._fast.builds == built
    assert {k: g for k, g in fast._fast.graphs.items() if k[0] == "verify"} == verify
    # other image size -> other prompt length -> new cache: draft/verify/tail and their state rebuilt
    assert check(3, wide).full_prefill
    new_verify = [k for k in fast._fast.graphs if k[0] == "verify"]
    assert len(new_verify) == 1 and new_verify[0] != next(iter(verify))
    assert new_verify[0][1] == fast.cache.max_len and len(fast._fast._spec) == 1
    assert {"draft", "tail"} <= stages(fast)
    check(4, wide)


def test_sampling_keeps_the_eager_loop(clip):
    """temperature > 0 (rejection sampling on the CPU generator) is not graphed; same results as eager."""
    kw = dict(temperature=0.8, top_p=0.9, max_new_tokens=8)
    fast, slow = engine(True, **kw), engine(False, **kw)
    for t in range(2):
        a, b = fast.step(*window(clip, t)), slow.step(*window(clip, t))
        assert a.token_ids == b.token_ids and a.verify_passes == b.verify_passes
    assert "verify" not in stages(fast) and fast._fast.host_reads == 0


# ------------------------------------------------------------------------------------------- loop level
class Oracle(OracleDrafter):
    def draft_logits(self, model, anchor_ids, context, check_ids=True, fast=False):
        return super().draft_logits(model, anchor_ids, context)


def make_oracle(model, prompt, ref, layers, corrupt_prob, seed):
    seq = torch.cat([prompt, torch.tensor(ref)])
    _, _, cap = prefill(model, seq, len(seq) + 1, layers)
    ref_feats = context_features(cap, layers)[0][PROMPT_LEN - 1:PROMPT_LEN - 1 + len(ref)]
    return Oracle(Drafter.for_target(model), ref, ref_feats, corrupt_prob, seed)


@pytest.fixture(scope="module")
def target():
    return build_target()


def loop_pair(model, ids, seed, corrupt_prob, max_new):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 1000, (PROMPT_LEN,), generator=g)
    layers = Drafter.for_target(model).cfg.target_layers
    max_len = PROMPT_LEN + max_new + 8 + 2
    cache, logits, cap = prefill(model, prompt, max_len, layers)
    ref, ref_n_ctx = autoregressive(model, ids, copy.deepcopy(cache), logits, PROMPT_LEN, max_new)
    ctx = context_features(cap, layers)
    eager_cache = copy.deepcopy(cache)
    eager = speculative_decode(model, make_oracle(model, prompt, ref, layers, corrupt_prob, seed), eager_cache,
                               logits, ctx, PROMPT_LEN, ids, max_new)
    owner = SimpleNamespace(model=model, cache=cache, dtype=model.dtype, device=model.device, ids=ids,
                            drafter=make_oracle(model, prompt, ref, layers, corrupt_prob, seed))
    fast = GraphedStages(owner)
    graphed = fast.speculative_decode(logits, ctx, PROMPT_LEN, max_new)
    return ref, ref_n_ctx, eager, eager_cache, graphed, cache, fast


@pytest.mark.parametrize("corrupt_prob", [0.0, 0.3])
@pytest.mark.parametrize("seed", range(3))
def test_graphed_loop_equals_eager_loop(target, seed, corrupt_prob):
    model, ids = target
    cases = {"budget": 0, "partial": 0}
    for max_new in (MAX_NEW, 1, 2, 9):
        ref, n_ctx, eager, eager_cache, graphed, cache, fast = loop_pair(model, ids, seed, corrupt_prob, max_new)
        assert graphed.tokens == eager.tokens == ref
        assert graphed.num_generated == eager.num_generated
        assert graphed.verify_passes == eager.verify_passes
        assert graphed.accept_lengths == eager.accept_lengths
        assert graphed.n_ctx == eager.n_ctx == n_ctx
        # closing ids: one tail forward, none when the last block ended on a drafted <|cot_end|>
        assert graphed.forward_passes == eager.forward_passes
        assert graphed.forward_passes - graphed.verify_passes in (0, 1)
        assert fast.host_reads == max(graphed.verify_passes, 1)
        # the expert reads slots [0, n_ctx): the same K/V as the eager loop wrote
        torch.testing.assert_close(cache.k[:, :, :, :n_ctx], eager_cache.k[:, :, :, :n_ctx], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.v[:, :, :, :n_ctx], eager_cache.v[:, :, :, :n_ctx], atol=1e-4, rtol=1e-4)
        cases["budget"] += graphed.num_generated == max_new
        cases["partial"] += any(1 < a < 8 for a in graphed.accept_lengths)
        if corrupt_prob == 0.0 and graphed.verify_passes:
            assert max(graphed.accept_lengths) == 8 or len(ref) <= 8
    assert cases["budget"] >= 1
    if corrupt_prob > 0:
        assert cases["partial"] >= 1


def test_loop_cases_covered(target):
    """Across seeds the runs above see <|cot_end|> end the reasoning inside a verified block, and a block
    that ends on a drafted <|cot_end|> carries <|traj_future_start|> too: no closing forward."""
    model, ids = target
    stops, closed = 0, 0
    for seed in range(3):
        ref, _, _, _, graphed, _, _ = loop_pair(model, ids, seed, 0.0, MAX_NEW)
        stops += ref[-1] == ids.cot_end and graphed.num_generated == len(ref) < MAX_NEW
        closed += graphed.verify_passes > 0 and graphed.forward_passes == graphed.verify_passes
    assert stops >= 1 and closed >= 1


def test_greedy_accept_matches_the_loop_rules():
    """speculative.greedy_accept (tensor ops) == the eager loop's accept / emit / stop rules."""
    g = torch.Generator().manual_seed(0)
    cot_end, block = 9, 8
    for _ in range(400):
        target = torch.randint(0, 12, (block,), generator=g)
        draft = torch.where(torch.rand(block - 1, generator=g) < 0.7, target[:-1],
                            torch.randint(0, 12, (block - 1,), generator=g))
        n_gen = int(torch.randint(1, 20, (1,), generator=g))
        max_new = int(torch.randint(n_gen + 1, 26, (1,), generator=g))
        a_ref = 0
        while a_ref < block - 1 and draft[a_ref] == target[a_ref]:
            a_ref += 1
        new = draft[:a_ref].tolist() + [int(target[a_ref])]
        emitted_ref, stop_ref = 0, False
        for j, tok in enumerate(new):
            emitted_ref += 1
            if tok == cot_end or n_gen + j + 1 >= max_new:
                stop_ref = True
                break
        a, emitted, stop = greedy_accept(draft, target, torch.tensor([n_gen]), cot_end, max_new)
        assert (int(a), int(emitted), bool(stop)) == (a_ref, emitted_ref, stop_ref)
        assert target[:int(emitted)].tolist() == new[:emitted_ref]


def test_place_closing_puts_traj_future_start_after_the_first_drafted_cot_end():
    cot_end, tfs = 9, 11
    t = lambda *v: torch.tensor(v)  # noqa: E731
    assert place_closing(t(1, 9, 3, 4), cot_end, tfs).tolist() == [1, 9, 11, 4]
    assert place_closing(t(9, 9, 3, 4), cot_end, tfs).tolist() == [9, 11, 3, 4]  # the first one only
    assert place_closing(t(1, 2, 3, 9), cot_end, tfs).tolist() == [1, 2, 3, 9]  # no room: unchanged
    assert place_closing(t(1, 2, 3, 4), cot_end, tfs).tolist() == [1, 2, 3, 4]  # no <|cot_end|>


def test_closed_in_block_only_when_both_closing_rows_were_written():
    """block = [anchor, drafts]; True iff the emitted reasoning ends on an accepted draft <|cot_end|>
    and the row after it holds <|traj_future_start|>."""
    cot_end, tfs = 9, 11
    block = torch.tensor([5, 1, 9, 11, 4])  # anchor 5, drafts 1, <|cot_end|>, <|traj_future_start|>, 4

    def closed(a, emitted, stop, last, ids=block):
        one = lambda v: torch.tensor([v])  # noqa: E731
        return bool(closed_in_block(ids, one(a), one(emitted), one(stop), one(last), cot_end, tfs))

    assert closed(a=2, emitted=2, stop=True, last=cot_end)      # drafts 1, <|cot_end|> accepted
    assert closed(a=4, emitted=2, stop=True, last=cot_end)      # more accepted after it: same rows
    assert not closed(a=1, emitted=2, stop=True, last=cot_end)  # <|cot_end|> was the bonus: not in the block
    assert not closed(a=2, emitted=2, stop=True, last=1)        # stopped by the budget on another id
    assert not closed(a=1, emitted=2, stop=False, last=7)       # still reasoning
    no_room = torch.tensor([5, 1, 2, 3, 9])
    assert not closed(a=4, emitted=4, stop=True, last=cot_end, ids=no_room)


def test_greedy_engine_closes_in_one_forward(clip):
    """Autoregressive decode feeds [last id, (<|cot_end|>), <|traj_future_start|>] as one causal forward (the
    graphed engine through its q = 3 `close` graph, left-aligned): graphed and eager engines agree."""
    fast, slow = engine(True, speculative=False), engine(False, speculative=False)
    for t in SCHEDULE[:3]:
        a, b = fast.step(*window(clip, t)), slow.step(*window(clip, t))
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-4, atol=1e-4)
    assert "close" in stages(fast) and "decode" in stages(fast)
