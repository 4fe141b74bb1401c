"""Draft vocabulary (FR-Spec / EAGLE-3 style): the drafter's head covers only K target ids.

Specification:
  * build_draft_vocab keeps the `size` most frequent ids (ties -> smaller id) plus the `always` ids;
  * draft logits over the vocabulary == the full-vocabulary draft logits restricted to those ids, and
    greedy drafts map back to target ids (never a trajectory id);
  * the gathered head is built once, cached, and rebuilt when the target head changes;
  * save / load round-trips the vocabulary; drafters saved without one (the shipped asset) still load;
  * greedy speculative decoding stays lossless (== the target's greedy decoding), also when target
    tokens lie outside the vocabulary (they are then never drafted, only emitted by verification);
  * sampling: q is a distribution that is 0 outside the vocabulary, and rejection sampling with such
    a q still emits tokens distributed as p;
  * the graphed loop (GraphedStages; on the CPU its stage functions run eagerly) == the eager loop.
"""

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch

from flashdrive_ros.engine import graphs as G
from flashdrive_ros.engine.graphed import GraphedStages
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny, load_model
from flashdrive_ros.engine.speculative import (Drafter, build_draft_vocab, context_features, load_drafter,
                                               rejection_sample, save_drafter, speculative_decode, target_probs)
from test_spec_lossless import PROMPT_LEN, OracleDrafter, autoregressive, build_target, prefill

torch.set_num_threads(2)
MAX_NEW = 24
SHIPPED_DRAFTER = TINY_DIR.parent / "tiny_dflash"


@pytest.fixture(scope="module")
def target():
    return build_target()


# ------------------------------------------------------------------------------------------- build_draft_vocab
def test_build_draft_vocab_keeps_the_most_frequent_ids_and_the_always_ids():
    seqs = [torch.tensor([-100, -100, 5, 5, 5, 7, 7, 9]), [9, 9, 3, 4, 4000, 4000, 4000, 4000]]
    # counts: 9 -> 3, 5 -> 3, 4000 -> 4 (excluded range), 7 -> 2, 3 -> 1, 4 -> 1
    v = build_draft_vocab(seqs, 4, always=(100,), exclude=(1000, 5000))
    assert v.dtype == torch.long and v.tolist() == [5, 7, 9, 100]     # 5 and 9 tie: both kept, 3/4 dropped
    assert build_draft_vocab(seqs, 3, always=(100,), exclude=(1000, 5000)).tolist() == [5, 9, 100]
    assert build_draft_vocab(seqs, 2, exclude=(1000, 5000)).tolist() == [5, 9]   # tie on count -> smaller id
    assert build_draft_vocab(seqs, 3).tolist() == [5, 9, 4000]
    # fewer distinct ids than `size`: filled with the smallest unseen ids when vocab_size is given
    assert build_draft_vocab(seqs, 8, vocab_size=20, exclude=(1000, 5000)).tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    assert build_draft_vocab(seqs, 8, exclude=(1000, 5000)).tolist() == [3, 4, 5, 7, 9]
    with pytest.raises(ValueError):
        build_draft_vocab(seqs, 1, always=(1, 2))


def test_set_draft_vocab_sorts_merges_and_checks_range():
    model = create_tiny(0)
    d = Drafter.for_target(model)
    assert d.draft_vocab is None and d.draft_vocab_size == model.cfg.text.vocab_size
    assert "draft_vocab" not in d.state_dict()
    d.set_draft_vocab([30, 10, 10, 20], always=(5,))
    assert d.draft_vocab.tolist() == [5, 10, 20, 30] and d.draft_vocab_size == 4
    assert "draft_vocab" in d.state_dict()
    with pytest.raises(ValueError):
        d.set_draft_vocab([model.cfg.text.vocab_size])
    d.set_draft_vocab(None)
    assert d.draft_vocab is None and "draft_vocab" not in d.state_dict()


# ------------------------------------------------------------------------------------------- logits / head
@pytest.mark.parametrize("k", [64, 100, 1052])  # a multiple of 64 (no padding) and two that need padding
@pytest.mark.parametrize("fast", [False, True])
def test_draft_logits_equal_the_full_logits_restricted_to_the_vocabulary(k, fast):
    model = create_tiny(0).eval()
    full = Drafter.for_target(model, seed=3).eval()
    sub = copy.deepcopy(full)
    vocab = torch.randperm(model.cfg.text.vocab_size, generator=torch.Generator().manual_seed(k))[:k]
    sub.set_draft_vocab(vocab)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 8, len(full.cfg.target_layers) * 128, generator=g)
    anchors = torch.tensor([5, 700])
    with torch.no_grad():
        ref = full.draft_logits(model, anchors, ctx, fast=fast)                 # [2, 7, V]
        got = sub.draft_logits(model, anchors, ctx, fast=fast)                  # [2, 7, K]
    ids = vocab.sort().values
    assert got.shape == (2, 7, k) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref[..., ids], rtol=1e-5, atol=1e-5)
    head = sub.draft_head(model)
    assert head.weight.shape == (k, 128)
    assert getattr(head, "padded_weight", head.weight).shape[0] % G.HEAD_MULTIPLE == 0
    # greedy drafts: the argmax over the vocabulary's ids, trajectory ids banned, as target ids
    banned = (model.cfg.traj_token_start_idx, model.cfg.traj_token_start_idx + model.cfg.traj_vocab_size)
    masked = torch.full_like(ref, float("-inf"))
    masked[..., ids] = ref[..., ids]
    want = G.greedy_token(masked, banned)
    assert torch.equal(sub.draft_greedy(got, banned), want)
    assert bool(torch.isin(want, ids).all())
    # full_logits: V-wide, -inf outside the vocabulary
    wide = sub.full_logits(got)
    assert wide.shape == ref.shape and torch.equal(wide[..., ids], got)
    outside = torch.ones(ref.shape[-1], dtype=torch.bool)
    outside[ids] = False
    assert bool(torch.isneginf(wide[..., outside]).all())


def test_draft_head_is_cached_and_rebuilt_when_the_target_head_changes():
    model = create_tiny(0).eval()
    d = Drafter.for_target(model)
    d.set_draft_vocab(range(0, 1000, 7))
    h1 = d.draft_head(model)
    assert d.draft_head(model) is h1                                            # cached
    G.fuse_projections(model)                                                   # lm_head -> PaddedHead (new storage)
    h2 = d.draft_head(model)
    assert h2 is not h1
    torch.testing.assert_close(h2.weight, h1.weight)
    model.to(torch.float64)
    d.to(torch.float64)
    h3 = d.draft_head(model)
    assert h3.weight.dtype == torch.float64 and h3 is not h2
    assert d.draft_vocab.dtype == torch.long                                    # .to(dtype) leaves the ids alone
    torch.testing.assert_close(h3.weight, model.vlm.lm_head.weight[d.draft_vocab])
    d.set_draft_vocab(range(10))                                                # new vocabulary: new head
    assert d.draft_head(model).weight.shape[0] == 10


# ------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trips_the_vocabulary(tmp_path):
    model = create_tiny(0).eval()
    d = Drafter.for_target(model, seed=2).eval()
    d.set_draft_vocab([3, 1, 4, 159, 2653, 5033, 5036])
    save_drafter(d, tmp_path)
    e = load_drafter(tmp_path, model)
    assert e.draft_vocab.dtype == torch.long and torch.equal(e.draft_vocab, d.draft_vocab)
    ctx = torch.randn(1, 8, len(d.cfg.target_layers) * 128)
    with torch.no_grad():
        assert torch.equal(d.draft_logits(model, torch.tensor([5]), ctx), e.draft_logits(model, torch.tensor([5]), ctx))


def test_drafters_saved_without_a_vocabulary_still_load(tmp_path):
    model = load_model("tiny", torch.float32, "cpu")
    shipped = load_drafter(SHIPPED_DRAFTER, model)  # saved before draft vocabularies existed
    assert shipped.draft_vocab is None
    save_drafter(Drafter.for_target(model), tmp_path)
    assert load_drafter(tmp_path, model).draft_vocab is None


# ------------------------------------------------------------------------------------------- greedy: lossless
class VocabOracle(OracleDrafter):
    """The oracle of test_spec_lossless (proposes the reference continuation, some drafts corrupted),
    restricted to its draft vocabulary: its logits are the oracle's V-wide logits at draft_vocab, so a
    reference token outside the vocabulary can never be proposed."""

    def draft_logits(self, model, anchor_ids, context, check_ids=True, fast=False):
        full = super().draft_logits(model, anchor_ids, context)
        return full if self.draft_vocab is None else full[..., self.draft_vocab]


def _oracle(model, prompt, ref, layers, vocab, corrupt_prob, seed):
    seq = torch.cat([prompt, torch.tensor(ref)])
    _, _, cap = prefill(model, seq, len(seq) + 1, layers)
    ref_feats = context_features(cap, layers)[0][PROMPT_LEN - 1:PROMPT_LEN - 1 + len(ref)]
    d = VocabOracle(Drafter.for_target(model), ref, ref_feats, corrupt_prob, seed)
    d.set_draft_vocab(vocab)
    return d


def _vocab_missing_some(ref, ids, model, seed):
    """A draft vocabulary holding about half of the reference's distinct tokens (and the closing
    specials, plus filler ids), so some reference tokens are outside it."""
    distinct = sorted(set(ref) - {ids.cot_end})
    keep = [t for i, t in enumerate(distinct) if (i + seed) % 2 == 0]
    filler = range(0, model.cfg.traj_token_start_idx, 17)
    return build_draft_vocab([keep, filler], len(keep) + len(filler), always=(ids.cot_end, ids.traj_future_start))


def _setup(model, ids, seed, max_new):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 1000, (PROMPT_LEN,), generator=g)
    layers = Drafter.for_target(model).cfg.target_layers
    max_len = PROMPT_LEN + max_new + 8 + 2
    cache, logits, cap = prefill(model, prompt, max_len, layers)
    ref, n_ctx = autoregressive(model, ids, copy.deepcopy(cache), logits, PROMPT_LEN, max_new)
    return prompt, layers, cache, logits, context_features(cap, layers), ref, n_ctx


@pytest.mark.parametrize("seed", range(3))
def test_greedy_with_a_vocabulary_missing_target_tokens_is_lossless(target, seed):
    model, ids = target
    prompt, layers, cache, logits, ctx, ref, n_ctx = _setup(model, ids, seed, MAX_NEW)
    vocab = _vocab_missing_some(ref, ids, model, seed)
    outside = [t for t in ref if t not in set(vocab.tolist())]
    assert outside  # the case under test: the target emits tokens the drafter cannot propose
    drafter = _oracle(model, prompt, ref, layers, vocab, 0.0, seed)
    res = speculative_decode(model, drafter, cache, logits, ctx, PROMPT_LEN, ids, MAX_NEW)
    assert res.tokens == ref and res.n_ctx == n_ctx
    assert res.tau > 1.0  # tokens inside the vocabulary are still accepted
    # the same oracle with the whole vocabulary accepts at least as much
    _, _, cache2, _, _, _, _ = _setup(model, ids, seed, MAX_NEW)
    full = _oracle(model, prompt, ref, layers, None, 0.0, seed)
    res_full = speculative_decode(model, full, cache2, logits, ctx, PROMPT_LEN, ids, MAX_NEW)
    assert res_full.tokens == ref and res_full.tau >= res.tau


@pytest.mark.parametrize("seed", range(2))
def test_greedy_with_an_untrained_vocabulary_drafter_is_lossless(target, seed):
    model, ids = target
    _, _, cache, logits, ctx, ref, n_ctx = _setup(model, ids, seed, MAX_NEW)
    drafter = Drafter.for_target(model, seed=123).eval()
    drafter.set_draft_vocab(range(0, 1024, 3), always=(ids.cot_end, ids.traj_future_start))
    res = speculative_decode(model, drafter, cache, logits, ctx, PROMPT_LEN, ids, MAX_NEW)
    assert res.tokens == ref and res.n_ctx == n_ctx


# ------------------------------------------------------------------------------------------- sampling
def test_draft_distribution_is_zero_outside_the_vocabulary_and_sums_to_one(target):
    model, ids = target
    d = Drafter.for_target(model, seed=5).eval()
    d.set_draft_vocab(range(0, 1024, 5), always=(ids.cot_end,))
    ctx = torch.randn(1, 8, len(d.cfg.target_layers) * 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sub = d.draft_logits(model, torch.tensor([7]), ctx)[0]
    for temperature, top_p in ((1.0, 1.0), (0.6, 0.98), (0.3, 0.5)):
        q = target_probs(d.full_logits(sub), ids.traj_start, ids.traj_vocab_size, temperature, top_p)
        assert q.shape == (7, model.cfg.text.vocab_size)
        assert bool((q >= 0).all()) and torch.allclose(q.sum(-1), torch.ones(7))
        inside = torch.zeros(q.shape[-1], dtype=torch.bool)
        inside[d.draft_vocab] = True
        assert float(q[:, ~inside].abs().max()) == 0.0
        drawn = torch.multinomial(q, 4, replacement=True, generator=torch.Generator().manual_seed(1))
        assert bool(torch.isin(drawn, d.draft_vocab).all())


def test_rejection_sampling_is_exact_with_a_draft_distribution_zero_outside_the_vocabulary():
    """Emitted token of one rejection-sampled step ~ p although q (draft vocabulary {1, 3}) misses
    most of p's support; TV over 20 000 draws (noise ~ 0.01)."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15, 0.0])
    q = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.zeros(6)
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=g)
        a, tok = rejection_sample(torch.stack([p, p]), q[None], d, g)
        counts[int(d) if a == 1 else tok] += 1
    tv = 0.5 * float((counts / n - p).abs().sum())
    assert tv < 0.03, tv


def test_sampled_speculative_decode_with_a_vocabulary_emits_valid_tokens(target):
    model, ids = target
    prompt, layers, cache, logits, ctx, _, _ = _setup(model, ids, 0, MAX_NEW)
    d = Drafter.for_target(model, seed=5).eval()
    d.set_draft_vocab(range(0, 1024, 2), always=(ids.cot_end, ids.traj_future_start))
    res = speculative_decode(model, d, cache, logits, ctx, PROMPT_LEN, ids, MAX_NEW, temperature=0.8, top_p=0.95,
                             generator=torch.Generator().manual_seed(0))
    assert res.tokens[-1] == ids.cot_end and 1 <= res.num_generated <= MAX_NEW
    assert not any(ids.traj_start <= t < ids.traj_end for t in res.tokens)


# ------------------------------------------------------------------------------------------- graphed == eager
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("corrupt_prob", [0.0, 0.3])
def test_graphed_loop_with_a_vocabulary_equals_the_eager_loop(target, seed, corrupt_prob):
    model, ids = target
    for max_new in (MAX_NEW, 9):
        prompt, layers, cache, logits, ctx, ref, n_ctx = _setup(model, ids, seed, max_new)
        vocab = _vocab_missing_some(ref, ids, model, seed)
        eager_cache = copy.deepcopy(cache)
        eager = speculative_decode(model, _oracle(model, prompt, ref, layers, vocab, corrupt_prob, seed),
                                   eager_cache, logits, ctx, PROMPT_LEN, ids, max_new)
        owner = SimpleNamespace(model=model, cache=cache, dtype=model.dtype, device=model.device, ids=ids,
                                drafter=_oracle(model, prompt, ref, layers, vocab, corrupt_prob, seed))
        fast = GraphedStages(owner)
        graphed = fast.speculative_decode(logits, ctx, PROMPT_LEN, max_new)
        assert graphed.tokens == eager.tokens == ref
        assert graphed.accept_lengths == eager.accept_lengths
        assert graphed.n_ctx == eager.n_ctx == n_ctx
        torch.testing.assert_close(cache.k[:, :, :, :n_ctx], eager_cache.k[:, :, :, :n_ctx], atol=1e-4, rtol=1e-4)


def test_engine_with_the_trained_drafter_and_a_vocabulary_is_lossless_graphed_and_eager():
    """DriveEngine (tiny, trained drafter): speculative with a draft vocabulary == autoregressive, for
    the graphed (cuda_graphs=True) and eager engines, also when the vocabulary misses some of the
    reasoning's tokens."""
    import numpy as np

    from flashdrive_ros.engine.engine import DriveEngine
    from test_engine_graphed_speculative import H, W, window

    rng = np.random.default_rng(7)
    clip = rng.integers(0, 256, (4, 8, H, W, 3), dtype=np.uint8)
    kw = dict(streaming=True, flow_schedule="adaptive", max_new_tokens=MAX_NEW)
    plain = DriveEngine.from_pretrained("tiny", cuda_graphs=False, **kw)
    outs = [plain.step(*window(clip, t)) for t in range(3)]
    text = [o.token_ids for o in outs]
    c = plain.ids
    vocab_ok = build_draft_vocab(text, 64, always=(c.cot_end, c.traj_future_start), exclude=(c.traj_start, c.traj_end))
    distinct = sorted(set(sum(text, [])) - {c.cot_end, c.traj_future_start})
    vocab_short = build_draft_vocab([distinct[::2]], len(distinct[::2]))  # no <|cot_end|>: the engine adds it
    for vocab in (vocab_ok, vocab_short):
        drafter = load_drafter(SHIPPED_DRAFTER, load_model("tiny", torch.float32, "cpu"))
        drafter.set_draft_vocab(vocab)
        engines = []
        for graphs in (True, False):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engines.append(DriveEngine.from_pretrained("tiny", cuda_graphs=graphs, speculative=True,
                                                           drafter=copy.deepcopy(drafter), **kw))
            added = [w for w in caught if "draft vocabulary lacks" in str(w.message)]
            assert len(added) == (1 if vocab is vocab_short else 0)
        fast, slow = engines
        assert c.cot_end in fast.drafter.draft_vocab.tolist()
        for t, o in enumerate(outs):
            a, b = fast.step(*window(clip, t)), slow.step(*window(clip, t))
            assert a.token_ids == b.token_ids == o.token_ids
            assert a.verify_passes == b.verify_passes and a.tokens_per_pass == b.tokens_per_pass
        assert "draft" in {k[0] for k in fast._fast.graphs}



# ------------------------------------------------------------------------------------------- the build command
def test_draft_vocab_command_builds_a_drafter_from_rollout_tokens(tmp_path):
    """training.draft_vocab (build): the `size` most frequent generated ids of the rollouts, with
    <|cot_end|> / <|traj_future_start|>, filled up with the smallest unseen ids, saved with a copy of
    the drafter (weights unchanged) that then loads with that vocabulary."""
    from flashdrive_ros.engine.engine import DriveEngine
    from flashdrive_ros.training import draft_vocab

    ids = DriveEngine.from_pretrained("tiny", streaming=False).ids
    seq = [-100] * 8 + [260, 260, 260, 13, 13, 316, 5] + [ids.cot_end, ids.traj_future_start]
    torch.save({"sequences": [{"tokens": torch.tensor(seq)}, {"tokens": torch.tensor(seq[:10])}]},
               tmp_path / "rollouts.pt")
    out = tmp_path / "drafter"
    draft_vocab.main(["--rollouts", str(tmp_path / "rollouts.pt"), "--size", "8", "--out", str(out)])
    model = load_model("tiny", torch.float32, "cpu")
    d = load_drafter(out, model)
    assert d.draft_vocab.tolist() == sorted({260, 13, 316, 5, ids.cot_end, ids.traj_future_start, 0, 1})
    shipped = load_drafter(SHIPPED_DRAFTER, model)
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in d.state_dict().items() if k != "draft_vocab")
