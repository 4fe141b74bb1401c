"""Checkpoint I/O: save -> load reproduces the model; anything that does not fit is refused by name."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.loader import CheckpointError, create_tiny, load_model, save_model
from flashdrive_ros.engine.model import AlpamayoModel
from flashdrive_ros.engine.vision import build_vision_tower


@pytest.fixture(scope="module")
def tiny():
    return create_tiny(seed=0)


@pytest.fixture()
def saved(tiny, tmp_path):
    return save_model(tiny, tmp_path / "ckpt")


def outputs(model):
    """Logits of a short text prefill, image embeddings and one expert pass: a fingerprint."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (7,), generator=g)
    n = 7
    cache = StaticKVCache.for_config(cfg.text, 1, n + 64, torch.arange(n + 64).expand(3, -1),
                                     dtype=model.dtype)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        hidden, _ = model.language_model(model.embed(ids)[None], cache, torch.arange(n), mask, n)
        grid = torch.tensor([[1, 4, 4]])
        pixels = torch.randn(16, 3 * 2 * 16 * 16, generator=g).to(model.dtype)
        image = model.encode_images(pixels, grid).embeds
        act = torch.randn(1, 64, cfg.expert.hidden_size, generator=g).to(model.dtype)
        expert = model.expert(act, cache, n, (n + torch.arange(64)).expand(3, -1))
    return model.logits(hidden), image.float(), model.action_velocity(expert)


def test_state_dict_keys_are_the_checkpoint_keys(tiny):
    keys = set(tiny.state_dict())
    for key in ("vlm.model.visual.patch_embed.proj.weight", "vlm.model.visual.pos_embed.weight",
                "vlm.model.visual.blocks.0.attn.qkv.weight", "vlm.model.visual.merger.linear_fc2.weight",
                "vlm.model.visual.deepstack_merger_list.2.norm.weight",
                "vlm.model.language_model.embed_tokens.weight",
                "vlm.model.language_model.layers.3.self_attn.k_norm.weight",
                "vlm.model.language_model.layers.0.mlp.gate_proj.weight", "vlm.model.language_model.norm.weight",
                "vlm.lm_head.weight", "expert.layers.3.self_attn.q_proj.weight", "expert.norm.weight",
                "action_in_proj.encoder.trunk.0.weight", "action_in_proj.encoder.trunk.2.weight",
                "action_in_proj.encoder.trunk.6.bias", "action_in_proj.norm.bias",
                "action_out_proj.weight", "action_out_proj.bias"):
        assert key in keys, key
    assert not any(k.startswith("expert.embed_tokens") for k in keys)
    cfg = tiny.cfg
    sd = tiny.state_dict()
    assert sd["expert.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 96)
    assert sd["expert.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 96)
    assert sd["vlm.lm_head.weight"].shape == (cfg.vocab_size, 128)
    assert sd["action_out_proj.weight"].shape == (2, 96)


def test_create_tiny_is_deterministic_and_seeded():
    a, b, c = create_tiny(0).state_dict(), create_tiny(0).state_dict(), create_tiny(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["vlm.lm_head.weight"], c["vlm.lm_head.weight"])


def test_save_then_load_gives_identical_outputs(tiny, saved):
    loaded = load_model(saved, dtype="float32")
    assert loaded.cfg == tiny.cfg
    for got, want in zip(outputs(loaded), outputs(tiny)):
        assert torch.equal(got, want)


def test_computed_buffers_rebuilt_like_a_normally_built_model(tiny, saved):
    """Weights come from the file, but RoPE / Fourier tables are recomputed: they must equal the
    ones a normally constructed model has."""
    loaded = load_model(saved, dtype="bfloat16")
    ref = dict(AlpamayoModel(tiny.cfg).named_buffers())
    got = dict(loaded.named_buffers())
    assert set(got) == set(ref) and len(ref) >= 3  # vision inv_freq (x2) + Fourier freqs
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert torch.equal(loaded.visual.rotary_pos_emb.inv_freq, build_vision_tower(tiny.cfg.vision).rotary_pos_emb.inv_freq)


def test_sharded_checkpoint_loads_the_same(tiny, tmp_path):
    d = save_model(tiny, tmp_path / "sharded", max_shard_bytes=2_000_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(d, dtype="fp32")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))


def test_bf16_load(tiny, saved):
    loaded = load_model(saved, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    logits, image, vel = outputs(loaded)
    ref_logits, _, _ = outputs(tiny)
    assert torch.isfinite(logits).all() and torch.isfinite(vel).all()
    assert ((logits - ref_logits).norm() / ref_logits.norm()) < 0.1


def _rewrite(saved, edit):
    path = saved / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_key_is_named(saved):
    _rewrite(saved, lambda s: s.pop("expert.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): expert\.norm\.weight"):
        load_model(saved, dtype="fp32")


def test_unexpected_key_is_named(saved):
    _rewrite(saved, lambda s: s.__setitem__("expert.embed_tokens.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): expert\.embed_tokens\.weight"):
        load_model(saved, dtype="fp32")


def test_wrong_shape_is_named(saved):
    _rewrite(saved, lambda s: s.__setitem__("action_out_proj.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"action_out_proj\.bias has \(3,\) but the model needs \(2,\)"):
        load_model(saved, dtype="fp32")


def test_missing_files_and_bad_dtype_are_refused(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(saved)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(saved, dtype="int8")


def test_config_json_keeps_the_release_layout(saved):
    d = json.loads((saved / "config.json").read_text())
    for key in ("vlm_name_or_path", "traj_vocab_size", "traj_token_start_idx", "traj_token_ids", "vocab_size",
                "expert_cfg", "action_in_proj_cfg", "action_space_cfg", "hist_traj_tokenizer_cfg", "diffusion_cfg",
                "min_pixels", "max_pixels", "tokens_per_history_traj"):
        assert key in d, key
    assert d["action_in_proj_cfg"]["_target_"].endswith("PerWaypointActionInProjV2")
    with safe_open(saved / "model.safetensors", "pt") as f:
        assert "vlm.lm_head.weight" in f.keys()
