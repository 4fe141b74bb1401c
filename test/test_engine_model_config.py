"""config.py reads and writes the nvidia/Alpamayo-1.5-10B config.json layout and checks invariants."""

import dataclasses
import json

import pytest

from flashdrive_ros.engine.config import AlpamayoConfig, ConfigError, full_config, tiny_config, with_tokenizer_ids

# What the release config.json looks like (alpamayo.md §10): the VLM is only named, sub-configs
# are Hydra `_target_` dicts, ids are the real ones.
RELEASE = {
    "model_type": "alpamayo1_5",
    "architectures": ["Alpamayo1_5"],
    "vlm_name_or_path": "nvidia/Cosmos-Reason2-8B",
    "vlm_backend": "qwenvl3",
    "traj_vocab_size": 4000,
    "tokens_per_history_traj": 48,
    "tokens_per_future_traj": 128,
    "model_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2",
    "min_pixels": 163840,
    "max_pixels": 196608,
    "add_special_tokens": True,
    "vocab_size": 155697,
    "traj_token_start_idx": 151669,
    "traj_token_ids": {"history": 155684, "future": 155685, "history_start": 155674, "future_start": 155681,
                       "history_end": 155676, "future_end": 155683},
    "padding_side": "left",
    "traj_tokenizer_cfg": {"_target_": "alpamayo1_5.action_space.discrete_action_space.DiscreteTrajectoryTokenizer",
                           "vocab_size": 3000, "num_bins": 3000},
    "hist_traj_tokenizer_cfg": {"_target_": "alpamayo1_5.models.delta_tokenizer.DeltaTrajectoryTokenizer",
                                "num_bins": 1000, "ego_xyz_min": [-4, -4, -10], "ego_xyz_max": [4, 4, 10]},
    "diffusion_cfg": {"_target_": "alpamayo1_5.diffusion.flow_matching.FlowMatching", "num_inference_steps": 10,
                      "int_method": "euler"},
    "action_space_cfg": {"_target_": "alpamayo1_5.action_space.UnicycleAccelCurvatureActionSpace",
                         "accel_mean": 0.02902694707164455, "accel_std": 0.6810426736454882,
                         "curvature_mean": 0.0002692167976330542, "curvature_std": 0.026148280660833106,
                         "n_waypoints": 64, "dt": 0.1},
    "action_in_proj_cfg": {"_target_": "alpamayo1_5.models.action_in_proj.PerWaypointActionInProjV2",
                           "hidden_size": 512, "num_enc_layers": 2, "num_fourier_feats": 20, "max_freq": 100},
    "action_out_proj_cfg": {"_target_": "torch.nn.Linear", "in_features": 2048, "out_features": 2},
    "expert_cfg": {"hidden_size": 2048, "intermediate_size": 8256, "num_attention_heads": 16, "head_dim": 128},
    "keep_same_dtype": True,
    "expert_non_causal_attention": True,
    "include_camera_ids": True,
    "include_frame_nums": True,
}


def test_release_layout_parses_to_the_full_shape():
    cfg = AlpamayoConfig.from_config_json(RELEASE)
    full = full_config()
    assert cfg.text == full.text and cfg.vision == full.vision  # Qwen3-VL-8B fallback
    assert cfg.expert_text_config().num_hidden_layers == 36
    assert cfg.expert_text_config().num_key_value_heads == 8
    assert cfg.expert_text_config().hidden_size == 2048
    assert cfg.hist_token_start_idx == 154669
    assert cfg.traj_token_ids["future_start"] == 155681
    assert cfg.action_space.accel_std == pytest.approx(0.6810426736454882)
    assert cfg.diffusion.num_inference_steps == 10
    assert cfg.diffusion.extra == {"int_method": "euler"}
    assert cfg.image_token_id == 151655
    assert cfg.extra["padding_side"] == "left" and cfg.extra["keep_same_dtype"] is True


def test_write_then_read_round_trips():
    for cfg in (full_config(), tiny_config(), AlpamayoConfig.from_config_json(RELEASE)):
        again = AlpamayoConfig.from_config_json(json.loads(json.dumps(cfg.to_config_json())))
        assert again == cfg


def test_release_keys_survive_a_round_trip():
    out = AlpamayoConfig.from_config_json(RELEASE).to_config_json()
    for key, value in RELEASE.items():
        if key.endswith("_cfg") and isinstance(value, dict):
            for k, v in value.items():
                assert out[key][k] == v, (key, k)
        else:
            assert out[key] == value, key


def test_embedded_vlm_config_overrides_the_fallback():
    d = json.loads(json.dumps(RELEASE))
    d["vlm_config"] = {"text_config": {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
                                       "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 6144,
                                       "rope_scaling": {"mrope_section": [24, 20, 20], "mrope_interleaved": True},
                                       "rope_theta": 5000000},
                       "vision_config": {"depth": 24, "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096,
                                         "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]}}
    cfg = AlpamayoConfig.from_config_json(d)
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.vision.depth) == (2048, 28, 24)
    assert cfg.vision.deepstack_visual_indexes == (5, 11, 17)
    assert cfg.text.vocab_size == 155697  # the extended vocabulary, not the base one


def test_tiny_preset_matches_design():
    cfg = tiny_config()
    t, v, e = cfg.text, cfg.vision, cfg.expert_text_config()
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.mrope_section) == (128, 4, 4, 2, 32, 256, (6, 5, 5))
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size,
            v.num_position_embeddings, v.deepstack_visual_indexes) == (4, 64, 2, 128, 128, 256, (1, 2, 3))
    assert (e.hidden_size, e.intermediate_size, e.num_attention_heads, e.num_hidden_layers,
            e.num_key_value_heads, e.head_dim) == (96, 192, 4, 4, 2, 32)
    assert cfg.vocab_size == 5052 and cfg.traj_token_start_idx == 1024 and cfg.hist_token_start_idx == 4024
    assert (cfg.min_pixels, cfg.max_pixels) == (16384, 32768)


def test_tokenizer_ids_are_taken_from_a_vocabulary():
    vocab = {"<|image_pad|>": 7, "<|video_pad|>": 8, "<|vision_start|>": 5, "<|vision_end|>": 6}
    cfg = with_tokenizer_ids(tiny_config(), vocab)
    assert (cfg.image_token_id, cfg.vision_start_token_id) == (7, 5)
    with pytest.raises(ConfigError, match="lacks '<\\|video_pad\\|>'"):
        with_tokenizer_ids(tiny_config(), {k: v for k, v in vocab.items() if k != "<|video_pad|>"})


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c.text, "mrope_section", (6, 5, 4)), "mrope_section"),
    (lambda c: setattr(c.vision, "out_hidden_size", 64), "out_hidden_size"),
    (lambda c: setattr(c.vision, "deepstack_visual_indexes", (1, 4)), "deepstack_visual_indexes"),
    (lambda c: setattr(c.expert, "head_dim", 64), "head_dim"),
    (lambda c: setattr(c.text, "vocab_size", 5051), "vocab_size"),
    (lambda c: setattr(c, "future_traj_bins", 2999), "traj_vocab_size"),
    (lambda c: setattr(c, "image_token_id", 2000), "image_token_id"),
    (lambda c: setattr(c, "tokens_per_history_traj", 47), "tokens_per_history_traj"),
    (lambda c: setattr(c.action_in_proj, "num_fourier_feats", 0), "num_fourier_feats"),
    (lambda c: c.traj_token_ids.__setitem__("history", 10), "traj_token_ids"),
])
def test_invariants_are_enforced_with_named_errors(edit, message):
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text), vision=dataclasses.replace(cfg.vision),
                              expert=dataclasses.replace(cfg.expert), traj_token_ids=dict(cfg.traj_token_ids),
                              action_in_proj=dataclasses.replace(cfg.action_in_proj))
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_bad_json_values_are_refused():
    d = json.loads(json.dumps(RELEASE))
    d["expert_cfg"]["hidden_size"] = "wide"
    with pytest.raises(ConfigError, match="expert_cfg.hidden_size"):
        AlpamayoConfig.from_config_json(d)
    d = json.loads(json.dumps(RELEASE))
    d["action_space_cfg"] = [1, 2]
    with pytest.raises(ConfigError, match="action_space_cfg must be an object"):
        AlpamayoConfig.from_config_json(d)
