"""The action expert attends to cache slots [0, n_ctx) plus its own tokens, nothing else."""

import pytest
import torch

from flashdrive_ros.engine.config import tiny_config
from flashdrive_ros.engine.expert import Expert
from flashdrive_ros.engine.kv_cache import StaticKVCache

N_SLOTS, N_CTX, T = 30, 20, 64


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    torch.manual_seed(0)
    expert = Expert(cfg.expert_text_config()).eval()
    t = cfg.text
    cache = StaticKVCache.for_config(t, 1, N_SLOTS, torch.arange(N_SLOTS).expand(3, -1))
    g = torch.Generator().manual_seed(1)
    for layer in range(t.num_hidden_layers):
        kv = torch.randn(2, 1, t.num_key_value_heads, N_SLOTS, t.head_dim, generator=g)
        cache.write(layer, torch.arange(N_SLOTS), kv[0], kv[1])
    x = torch.randn(2, T, cfg.expert.hidden_size, generator=g)
    positions = (N_CTX + torch.arange(T)).expand(3, -1)
    return expert, cache, x, positions


def clone(cache):
    c = StaticKVCache.for_config(tiny_config().text, cache.batch, cache.max_len, cache.positions)
    c.k, c.v, c.k_rot = cache.k.clone(), cache.v.clone(), cache.k_rot.clone()
    return c


@torch.no_grad()
def test_invariant_to_slots_beyond_n_ctx(parts):
    expert, cache, x, positions = parts
    ref = expert(x, cache, N_CTX, positions)
    other = clone(cache)
    perm = N_CTX + torch.randperm(N_SLOTS - N_CTX, generator=torch.Generator().manual_seed(3))
    other.shift(perm, torch.arange(N_CTX, N_SLOTS))  # permute the invisible slots
    other.v[:, :, :, N_CTX:] += 5.0  # and perturb them
    assert torch.allclose(expert(x, other, N_CTX, positions), ref, atol=1e-6)
    # Passing a larger per-sample n_ctx tensor that equals N_CTX gives the same answer too.
    assert torch.allclose(expert(x, other, torch.tensor([N_CTX, N_CTX]), positions), ref, atol=1e-6)


@torch.no_grad()
def test_changes_when_a_visible_slot_changes(parts):
    expert, cache, x, positions = parts
    ref = expert(x, cache, N_CTX, positions)
    other = clone(cache)
    other.v[:, :, :, N_CTX - 1] += 1.0
    assert not torch.allclose(expert(x, other, N_CTX, positions), ref, atol=1e-4)


@torch.no_grad()
def test_does_not_modify_the_cache_and_tokens_see_each_other(parts):
    expert, cache, x, positions = parts
    before = cache.k.clone(), cache.v.clone()
    ref = expert(x, cache, N_CTX, positions)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    # Non-causal: changing the last action token changes the first token's output.
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(expert(y, cache, N_CTX, positions)[:, 0], ref[:, 0], atol=1e-5)


@torch.no_grad()
def test_per_sample_n_ctx_equals_separate_runs(parts):
    expert, cache, x, positions = parts
    short = (N_CTX - 5 + torch.arange(T)).expand(3, -1)
    both = expert(x, cache, torch.tensor([N_CTX, N_CTX - 5]), torch.stack([positions, short]))
    assert torch.allclose(both[0], expert(x[:1], cache, N_CTX, positions)[0], atol=1e-5)
    assert torch.allclose(both[1], expert(x[1:], cache, N_CTX - 5, short)[0], atol=1e-5)


def test_bad_inputs_are_refused(parts):
    expert, cache, x, positions = parts
    with pytest.raises(ValueError, match="action_embeds must be"):
        expert(x[..., :5], cache, N_CTX, positions)
    with pytest.raises(ValueError, match="n_ctx must be in"):
        expert(x, cache, N_SLOTS + 1, positions)
    with pytest.raises(ValueError, match="action_positions must be"):
        expert(x, cache, N_CTX, positions[:, :10])
