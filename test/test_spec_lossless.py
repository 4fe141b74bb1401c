"""Speculative decoding is lossless: greedy output == greedy autoregressive output, token for token.

The target is the tiny text model (random weights, CPU float32) driven directly on a StaticKVCache:
a random text prompt is prefilled, then (a) the reference token-by-token loop (the same rules as
DriveEngine._decode) and (b) speculative_decode run from copies of the same cache. Drafters:
  * an untrained random drafter (almost nothing accepted),
  * an "oracle" drafter that knows the reference continuation (finds its place from the context
    hidden state) and corrupts some drafts, so full, partial and empty acceptances all happen,
    <|cot_end|> lands inside accepted spans and the budget runs out inside a block.
Losslessness must not depend on draft quality, so every drafter must reproduce the reference.
"""

import copy

import pytest
import torch

from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny
from flashdrive_ros.engine.rope import extend_positions
from flashdrive_ros.engine.sampling import choose_next_token
from flashdrive_ros.engine.speculative import Drafter, context_features, speculative_decode
from flashdrive_ros.engine.streaming import causal_mask
from flashdrive_ros.engine.tokens import TokenIds, load_tokenizer

torch.set_num_threads(2)
PROMPT_LEN = 24
MAX_NEW = 24


def build_target():
    model = create_tiny(0).eval()
    tok = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    ids = TokenIds.from_tokenizer(tok, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    # Random weights almost never emit <|cot_end|>: swap its lm_head row with that of a token the
    # model does emit, so that reasoning ends at varying lengths (as a trained model's does).
    with torch.no_grad():
        w = model.vlm.lm_head.weight
        frequent = 944  # among the tokens this seed's model emits most
        w[[ids.cot_end, frequent]] = w[[frequent, ids.cot_end]]
    return model, ids


@pytest.fixture(scope="module")
def target():
    return build_target()


def prefill(model, prompt, max_len, capture=()):
    """Prompt at slots [0, L) with consecutive positions -> (cache, last logits [1, V], captured)."""
    positions = extend_positions(torch.arange(len(prompt)).expand(3, -1), max_len)
    cache = StaticKVCache.for_config(model.cfg.text, 1, max_len, positions)
    slots = torch.arange(len(prompt))
    with torch.no_grad():
        hidden, cap = model.language_model(model.embed(prompt[None]), cache, slots,
                                           causal_mask(slots, len(prompt)), len(prompt), capture_layers=capture)
        return cache, model.logits(hidden[:, -1]), cap


@torch.no_grad()
def autoregressive(model, ids, cache, logits, start, max_new, temperature=0.0, top_p=1.0, gen=None):
    """Token-by-token reference with DriveEngine._decode's rules; returns (tokens, n_ctx)."""
    max_len = cache.max_len
    keys = torch.arange(max_len)
    slot, out = start, []

    def feed(token):
        nonlocal slot
        s = torch.tensor([slot])
        mask = torch.where(keys <= slot, 0.0, torch.finfo(torch.float32).min).view(1, 1, 1, max_len)
        hidden, _ = model.language_model(model.embed(s.new_tensor([[token]])), cache, s, mask, max_len)
        slot += 1
        return model.logits(hidden[:, -1])

    while True:
        out.append(int(choose_next_token(logits, ids.traj_start, ids.traj_vocab_size, temperature, top_p, gen)[0]))
        if out[-1] == ids.cot_end or len(out) >= max_new:
            break
        logits = feed(out[-1])
    feed(out[-1])
    if out[-1] != ids.cot_end:
        out.append(ids.cot_end)
        feed(ids.cot_end)
    feed(ids.traj_future_start)
    return out, slot


class OracleDrafter(Drafter):
    """Proposes the reference continuation (with corruptions): finds where it is by matching the last
    context hidden state against the reference's teacher-forced hidden states."""

    def __init__(self, base: Drafter, ref_tokens, ref_feats, corrupt_prob, seed):
        super().__init__(base.cfg)
        self.ref_tokens, self.ref_feats = ref_tokens, ref_feats  # feats[i]: position before ref_tokens[i]
        self.corrupt_prob = corrupt_prob
        self.rng = torch.Generator().manual_seed(seed)

    def draft_logits(self, model, anchor_ids, context):
        i = int((self.ref_feats - context[0, -1]).norm(dim=-1).argmin())  # index of the anchor
        nxt = self.ref_tokens[i + 1:i + self.cfg.block_size]
        nxt = nxt + [0] * (self.cfg.block_size - 1 - len(nxt))
        logits = torch.zeros(self.cfg.block_size - 1, model.cfg.text.vocab_size)
        for j, t in enumerate(nxt):
            if float(torch.rand(1, generator=self.rng)) < self.corrupt_prob:
                t = int(torch.randint(0, 1000, (1,), generator=self.rng))
            logits[j, t] = 30.0
        return logits[None]


def run_pair(model, ids, drafter_factory, prompt_seed, max_new=MAX_NEW):
    g = torch.Generator().manual_seed(prompt_seed)
    prompt = torch.randint(0, 1000, (PROMPT_LEN,), generator=g)
    max_len = PROMPT_LEN + max_new + 8 + 2
    probe = Drafter.for_target(model)
    layers = probe.cfg.target_layers
    cache, logits, cap = prefill(model, prompt, max_len, layers)
    ref_cache = copy.deepcopy(cache)
    ref, ref_n_ctx = autoregressive(model, ids, ref_cache, logits, PROMPT_LEN, max_new)
    drafter = drafter_factory(model, prompt, ref, layers)
    res = speculative_decode(model, drafter, cache, logits, context_features(cap, layers), PROMPT_LEN, ids, max_new)
    return ref, ref_n_ctx, ref_cache, res, cache


def oracle_factory(corrupt_prob, seed):
    def make(model, prompt, ref, layers):
        seq = torch.cat([prompt, torch.tensor(ref)])
        _, _, cap = prefill(model, seq, len(seq) + 1, layers)
        feats = context_features(cap, layers)[0]
        # the anchor ref[i] sits at position PROMPT_LEN + i; its context ends one position earlier
        ref_feats = feats[PROMPT_LEN - 1:PROMPT_LEN - 1 + len(ref)]
        return OracleDrafter(Drafter.for_target(model), ref, ref_feats, corrupt_prob, seed)
    return make


def random_factory(model, prompt, ref, layers):
    return Drafter.for_target(model, seed=123).eval()


@pytest.mark.parametrize("prompt_seed", range(4))
def test_untrained_drafter_greedy_output_identical(target, prompt_seed):
    model, ids = target
    ref, n_ctx, _, res, _ = run_pair(model, ids, random_factory, prompt_seed)
    assert res.tokens == ref
    assert res.n_ctx == n_ctx


@pytest.mark.parametrize("corrupt_prob", [0.0, 0.3])
@pytest.mark.parametrize("prompt_seed", range(4))
def test_oracle_drafter_greedy_output_identical_and_cache_equal(target, prompt_seed, corrupt_prob):
    model, ids = target
    ref, n_ctx, ref_cache, res, cache = run_pair(model, ids, oracle_factory(corrupt_prob, prompt_seed), prompt_seed)
    assert res.tokens == ref
    assert res.n_ctx == n_ctx
    # The expert reads slots [0, n_ctx): same K/V as token-by-token decoding (up to float rounding
    # of an 8-row vs 1-row forward), and nothing left behind past n_ctx.
    assert torch.allclose(cache.k[:, :, :, :n_ctx], ref_cache.k[:, :, :, :n_ctx], atol=1e-4)
    assert torch.allclose(cache.v[:, :, :, :n_ctx], ref_cache.v[:, :, :, :n_ctx], atol=1e-4)
    assert cache.k[:, :, :, n_ctx:].abs().max() == 0 and cache.v[:, :, :, n_ctx:].abs().max() == 0
    if corrupt_prob == 0.0:
        # perfect drafts: every pass accepts the whole block (+ bonus) until the stop
        assert res.verify_passes <= -(-(len(ref) - 1) // 8)
        assert max(res.accept_lengths) == 8 or len(ref) <= 8


def test_oracle_runs_cover_the_interesting_cases(target):
    """The parametrised runs above see cot_end mid-block, budget exhaustion and partial accepts."""
    model, ids = target
    stops, budget, partial = 0, 0, 0
    for seed in range(4):
        ref, _, _, res, _ = run_pair(model, ids, oracle_factory(0.3, seed), seed)
        stops += ref[-1] == ids.cot_end and res.num_generated == len(ref)
        budget += res.num_generated == MAX_NEW
        partial += any(1 < a < 8 for a in res.accept_lengths)
    assert stops >= 1 and budget >= 1 and partial >= 1


def test_budget_inside_a_block_and_first_token_stop(target):
    model, ids = target
    for max_new in (1, 2, 9):
        ref, n_ctx, _, res, _ = run_pair(model, ids, oracle_factory(0.0, 0), 3, max_new=max_new)
        assert res.tokens == ref and res.n_ctx == n_ctx
        assert res.num_generated <= max_new


class GarbageClearCache(StaticKVCache):
    """A cache whose clear() writes large random values instead of zeros: only the valid-length mask
    can then keep rejected slots out of attention."""

    def clear(self, slots=None):
        slots = torch.arange(self.max_len) if slots is None else slots
        for t in (self.k, self.v, self.k_rot):
            t[:, :, :, slots] = 50.0 * torch.randn_like(t[:, :, :, slots])


@pytest.mark.parametrize("prompt_seed", range(2))
def test_rejected_and_unused_slots_are_never_visible(target, prompt_seed):
    model, ids = target
    ref, n_ctx, _, _, _ = run_pair(model, ids, oracle_factory(0.3, prompt_seed), prompt_seed)
    g = torch.Generator().manual_seed(prompt_seed)
    prompt = torch.randint(0, 1000, (PROMPT_LEN,), generator=g)
    max_len = PROMPT_LEN + MAX_NEW + 8 + 2
    drafter = oracle_factory(0.3, prompt_seed)(model, prompt, ref, Drafter.for_target(model).cfg.target_layers)
    layers = drafter.cfg.target_layers
    clean, logits, cap = prefill(model, prompt, max_len, layers)
    dirty = GarbageClearCache(clean.n_layers, 1, clean.n_kv_heads, max_len, clean.head_dim, clean.positions,
                              clean.rope_theta, clean.mrope_section)
    for name in ("k", "v", "k_rot"):
        getattr(dirty, name).copy_(getattr(clean, name))
    dirty.clear(torch.arange(PROMPT_LEN, max_len))  # garbage in every slot past the prompt, too
    res = speculative_decode(model, drafter, dirty, logits, context_features(cap, layers), PROMPT_LEN, ids, MAX_NEW)
    assert any(a < 8 for a in res.accept_lengths)  # there were rejected slots
    assert res.tokens == ref and res.n_ctx == n_ctx
