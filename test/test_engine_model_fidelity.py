"""Our Qwen3-VL text decoder + cache reproduces transformers' Qwen3VLForConditionalGeneration.

Both get the same random weights (our VLM's state_dict keys equal transformers' keys), the same
multimodal prompt (2 images of different grids, text around them); prefill logits and a decode
step through our StaticKVCache must match transformers within 1e-4 relative error.
"""

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from flashdrive_ros.engine.config import tiny_config
from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.model import _VLM
from flashdrive_ros.engine.rope import extend_positions, rope_index
from flashdrive_ros.engine.vision import encode_images


def hf_model(cfg):
    t, v = cfg.text, cfg.vision
    hf_cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                         rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                                              mrope_section=list(t.mrope_section), mrope_interleaved=True)),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_heads=v.num_heads, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                           spatial_merge_size=v.spatial_merge_size, out_hidden_size=v.out_hidden_size,
                           num_position_embeddings=v.num_position_embeddings,
                           deepstack_visual_indexes=list(v.deepstack_visual_indexes)),
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.text_config._attn_implementation = "sdpa"
    hf_cfg.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(hf_cfg).eval()
    # Non-trivial norm weights so that a swapped or skipped norm shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.3 * torch.randn_like(p))
            elif "lm_head" in name or "embed_tokens" in name:
                p.mul_(20.0)
    return model


def prompt(cfg, grids):
    """text, <vs> image <ve>, text, <vs> image <ve>, text -> ids [L]."""
    g = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(0, 1000, (n,), generator=g)  # noqa: E731
    merge = cfg.vision.spatial_merge_size ** 2
    parts = [text(5)]
    for t, h, w in grids:
        parts += [torch.tensor([cfg.vision_start_token_id]),
                  torch.full((t * h * w // merge,), cfg.image_token_id),
                  torch.tensor([cfg.vision_end_token_id]), text(3)]
    parts.append(text(4))
    return torch.cat(parts)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    hf = hf_model(cfg)
    ours = _VLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    grids = torch.tensor([[1, 4, 6], [1, 6, 4]])
    ids = prompt(cfg, grids.tolist())
    patch_dim = 3 * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    pixels = torch.randn(int(grids.prod(-1).sum()), patch_dim, generator=torch.Generator().manual_seed(2))
    return cfg, hf, ours, grids, ids, pixels


def our_prefill(cfg, ours, ids, pixels, grids, extra_slots=4, use_deepstack=True):
    feats = encode_images(ours.model.visual, pixels, grids)
    L = ids.numel()
    positions, _ = rope_index(ids, grids, cfg.image_token_id, cfg.vision.spatial_merge_size)
    cache = StaticKVCache.for_config(cfg.text, 1, L + extra_slots, extend_positions(positions, L + extra_slots),
                                     torch.float32)
    lm = ours.model.language_model
    visual = ids == cfg.image_token_id
    embeds = lm.embed_tokens(ids).clone()
    embeds[visual] = feats.embeds
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    hidden, _ = lm(embeds[None], cache, torch.arange(L), mask, L, visual,
                   feats.deepstack if use_deepstack else None)
    return ours.lm_head(hidden), cache


@torch.no_grad()
def test_vision_tower_matches_transformers(setup):
    cfg, hf, ours, grids, ids, pixels = setup
    ref = hf.model.get_image_features(pixels, grids, return_dict=True)
    got = encode_images(ours.model.visual, pixels, grids)
    assert torch.equal(got.embeds, torch.cat(ref.pooler_output))
    assert len(got.deepstack) == len(cfg.vision.deepstack_visual_indexes)
    for a, b in zip(got.deepstack, ref.deepstack_features):
        assert torch.equal(a, torch.cat(b))
    assert got.tokens_per_image == [6, 6]


@torch.no_grad()
def test_rope_index_matches_transformers(setup):
    cfg, hf, ours, grids, ids, pixels = setup
    mm = (ids == cfg.image_token_id).int()[None]
    ref, delta = hf.model.get_rope_index(ids[None], mm, image_grid_thw=grids)
    got, nxt = rope_index(ids, grids, cfg.image_token_id, cfg.vision.spatial_merge_size)
    assert torch.equal(got, ref[:, 0])
    assert nxt == int(delta) + ids.numel()


@torch.no_grad()
def test_prefill_and_decode_logits_match_transformers(setup):
    cfg, hf, ours, grids, ids, pixels = setup
    mm = (ids == cfg.image_token_id).int()[None]
    ref = hf(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=mm, use_cache=True)
    logits, cache = our_prefill(cfg, ours, ids, pixels, grids)
    assert rel_err(logits, ref.logits) < 1e-4

    # The comparison is sensitive: dropping deepstack changes the logits well beyond tolerance.
    no_ds, _ = our_prefill(cfg, ours, ids, pixels, grids, use_deepstack=False)
    assert rel_err(no_ds, ref.logits) > 1e-3

    # One decode step: transformers continues from its DynamicCache with rope_deltas; we write
    # slot L whose table position is max + 1 (consecutive extension).
    L = ids.numel()
    nxt = ref.logits[0, -1].argmax()
    ref2 = hf(input_ids=nxt.view(1, 1), past_key_values=ref.past_key_values, use_cache=True,
              mm_token_type_ids=torch.zeros(1, 1, dtype=torch.int))
    lm = ours.model.language_model
    hidden, _ = lm(lm.embed_tokens(nxt.view(1, 1)), cache, torch.tensor([L]), torch.zeros(1, 1, 1, L + 1), L + 1)
    assert rel_err(ours.lm_head(hidden), ref2.logits) < 1e-4


@torch.no_grad()
def test_capture_layers_returns_decoder_layer_outputs(setup):
    cfg, hf, ours, grids, ids, pixels = setup
    L = ids.numel()
    positions, _ = rope_index(ids, grids, cfg.image_token_id, cfg.vision.spatial_merge_size)
    lm = ours.model.language_model
    cache = StaticKVCache.for_config(cfg.text, 1, L, positions)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    x = lm.embed_tokens(ids)[None]
    mm = torch.zeros(1, L, dtype=torch.int)
    ref = hf.model.language_model(inputs_embeds=x, position_ids=positions[:, None], output_hidden_states=True)
    _, captured = lm(x, cache, torch.arange(L), mask, L, capture_layers=(0, 2))
    assert set(captured) == {0, 2}
    # transformers' hidden_states[i + 1] is decoder layer i's output.
    assert rel_err(captured[0], ref.hidden_states[1]) < 1e-5
    assert rel_err(captured[2], ref.hidden_states[3]) < 1e-5
    del mm


@torch.no_grad()
def test_bf16_prefill_stays_within_bf16_noise_of_transformers():
    """Same weights in bfloat16 on both sides: rounding differs only in op order (measured ~0.5%)."""
    cfg = tiny_config()
    hf = hf_model(cfg).to(torch.bfloat16)
    ours = _VLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours = ours.to(torch.bfloat16)
    grids = torch.tensor([[1, 4, 6], [1, 6, 4]])
    ids = prompt(cfg, grids.tolist())
    pixels = torch.randn(48, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(2))
    mm = (ids == cfg.image_token_id).int()[None]
    ref = hf(input_ids=ids[None], pixel_values=pixels.bfloat16(), image_grid_thw=grids, mm_token_type_ids=mm)
    feats = encode_images(ours.model.visual, pixels, grids)
    L = ids.numel()
    positions, _ = rope_index(ids, grids, cfg.image_token_id, cfg.vision.spatial_merge_size)
    cache = StaticKVCache.for_config(cfg.text, 1, L, positions, torch.bfloat16)
    lm = ours.model.language_model
    visual = ids == cfg.image_token_id
    embeds = lm.embed_tokens(ids).clone()
    embeds[visual] = feats.embeds
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    hidden, _ = lm(embeds[None], cache, torch.arange(L), mask, L, visual, feats.deepstack)
    assert cache.k.dtype == torch.bfloat16
    assert rel_err(ours.lm_head(hidden).float(), ref.logits.float()) < 2e-2
