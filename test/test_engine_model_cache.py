"""StaticKVCache keeps keys pre-RoPE: a key moved to another slot reads as if computed there."""

import pytest
import torch

from flashdrive_ros.engine.config import tiny_config
from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.rope import apply_rotary, extend_positions, mrope_cos_sin, rope_index
from flashdrive_ros.engine.text_model import TextModel


def image_positions(n_slots=40):
    """A table with a 2-image layout (so h/w differ from t) extended consecutively."""
    cfg = tiny_config()
    ids = torch.tensor([1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id, 3,
                        cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id, 4, 5])
    pos, _ = rope_index(ids, torch.tensor([[1, 4, 6], [1, 4, 6]]), cfg.image_token_id, 2)
    return extend_positions(pos, n_slots)


def make_cache(batch=1, n_slots=40):
    t = tiny_config().text
    return StaticKVCache.for_config(t, batch, n_slots, image_positions(n_slots))


def test_shifted_key_equals_key_rotated_fresh_at_destination():
    cfg = tiny_config().text
    cache = make_cache()
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, cfg.num_key_value_heads, 6, cfg.head_dim, generator=g)
    v = torch.randn(1, cfg.num_key_value_heads, 6, cfg.head_dim, generator=g)
    src, dst = torch.arange(11, 17), torch.arange(3, 9)  # second image's slots -> first image's slots
    cache.write(1, src, k, v)
    cache.shift(src, dst)
    cos, sin = mrope_cos_sin(cache.positions[:, dst], cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    fresh = apply_rotary(k, cos, sin)
    assert torch.allclose(cache.rotated_keys(1, 40)[:, :, dst], fresh, atol=1e-6)
    assert torch.equal(cache.values(1, 40)[:, :, dst], v)
    # The positions really differ, so the check is not vacuous.
    assert not torch.allclose(cache.rotated_keys(1, 40)[:, :, src], fresh, atol=1e-3)
    # Other layers untouched by the write stay zero.
    assert cache.rotated_keys(0, 40).abs().sum() == 0


def test_prefill_at_shifted_slots_equals_shift_of_earlier_prefill():
    """Text model view: K computed for a block at slots A and shifted to B == K computed at B."""
    cfg = tiny_config().text
    torch.manual_seed(0)
    lm = TextModel(cfg).eval()
    x = torch.randn(1, 6, cfg.hidden_size)
    a, b = make_cache(), make_cache()
    with torch.no_grad():
        lm(x, a, torch.arange(11, 17), None, 17)
        a.shift(torch.arange(11, 17), torch.arange(3, 9))
        # Same block, same visible context (none but itself): computed fresh at the destination.
        b_mask = torch.zeros(1, 1, 6, 9)
        b_mask[..., :3] = float("-inf")
        lm(x, b, torch.arange(3, 9), b_mask, 9)
    # Layer 0 keys depend only on the tokens themselves, so they must agree exactly after rotation.
    assert torch.allclose(a.rotated_keys(0, 9)[:, :, 3:9], b.rotated_keys(0, 9)[:, :, 3:9], atol=1e-5)


def test_set_positions_rerotates_stored_keys():
    cfg = tiny_config().text
    cache = make_cache()
    k = torch.randn(1, cfg.num_key_value_heads, 40, cfg.head_dim)
    cache.write(0, torch.arange(40), k, k)
    new = torch.arange(100, 140).expand(3, -1)
    cache.set_positions(new)
    cos, sin = mrope_cos_sin(new, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    assert torch.allclose(cache.rotated_keys(0, 40), apply_rotary(k, cos, sin), atol=1e-6)


def test_clear_and_repeat_batch():
    cfg = tiny_config().text
    cache = make_cache()
    k = torch.ones(1, cfg.num_key_value_heads, 2, cfg.head_dim)
    cache.write(2, torch.tensor([5, 6]), k, k)
    cache.repeat_batch(3)
    assert cache.k.shape[1] == 3 and torch.equal(cache.k[:, 0], cache.k[:, 2])
    cache.clear(torch.tensor([5]))
    assert cache.values(2, 40)[:, :, 5].abs().sum() == 0 and cache.values(2, 40)[:, :, 6].abs().sum() > 0


def test_bad_input_is_refused_with_a_clear_message():
    cfg = tiny_config().text
    cache = make_cache()
    k = torch.zeros(1, cfg.num_key_value_heads, 2, cfg.head_dim)
    with pytest.raises(IndexError, match="slots out of range"):
        cache.write(0, torch.tensor([39, 40]), k, k)
    with pytest.raises(ValueError, match="k must be"):
        cache.write(0, torch.tensor([1, 2]), k[:, :1], k)
    with pytest.raises(ValueError, match="differ in length"):
        cache.shift(torch.tensor([1, 2]), torch.tensor([3]))
    with pytest.raises(ValueError, match="positions must be"):
        cache.set_positions(torch.zeros(3, 7, dtype=torch.long))
