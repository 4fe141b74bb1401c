"""Training scripts on one tiny generated clip: the sample cache, the whole-VLA trainer and the
streaming fine-tuning (smoke runs; the real training is not run in CI)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flashdrive_ros.data import WindowReader, synthetic_dataset
from flashdrive_ros.engine.action_space import UnicycleActionSpace
from flashdrive_ros.engine.history import encode_history, history_kwargs
from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.loader import create_tiny, load_model
from flashdrive_ros.engine.preprocess import preprocess_images
from flashdrive_ros.engine.rope import extend_positions
from flashdrive_ros.engine.streaming import causal_mask
from flashdrive_ros.engine.tokens import TokenIds
from flashdrive_ros.training import streaming_finetune, train
from flashdrive_ros.training.dataset import SampleSet, build_samples, find_revision, load_cfg_and_tokenizer

torch.set_num_threads(2)
SECONDS = 9.0  # t0 = 1.7 .. 2.6 s: 10 windows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("pai"), n_clips=1, seconds=SECONDS, width=320, height=180, seed=5)


@pytest.fixture(scope="module")
def cfg_tok():
    return load_cfg_and_tokenizer("tiny")


@pytest.fixture(scope="module")
def samples(dataset, cfg_tok, tmp_path_factory):
    cfg, tok = cfg_tok
    built = build_samples([dataset], cfg, tok, log=lambda m: None)
    path = tmp_path_factory.mktemp("cache") / "samples.pt"
    built.save(path)
    return path


def token_ids(cfg, tok):
    return TokenIds.from_tokenizer(tok, cfg.traj_token_start_idx, cfg.traj_vocab_size, cfg.future_traj_bins,
                                   cfg.hist_tokenizer.num_bins, cfg.traj_token_ids or None)


# ---------------------------------------------------------------------------------- sample cache
def test_cached_window_matches_the_engine_inputs(dataset, cfg_tok, samples):
    cfg, tok = cfg_tok
    ids = token_ids(cfg, tok)
    s = SampleSet.load(samples)
    reader = WindowReader(*dataset)
    assert len(s) == 10 and s.t0_us.tolist() == list(range(1_700_000, 2_700_000, 100_000))
    i = 3
    w = reader.read_window(s.clip_ids[0], int(s.t0_us[i]))
    # Patches from the cached (pre-resized) frames are exactly the engine's patches of the raw frames.
    raw, raw_grid = preprocess_images(w.frames.reshape(-1, *w.frames.shape[2:]), cfg.min_pixels, cfg.max_pixels)
    cached, cached_grid = s.pixels([i])
    assert torch.equal(raw_grid, cached_grid)
    assert torch.equal(raw, cached)
    # The prompt carries this window's history tokens; the target is label + <|cot_end|><|traj_future_start|>.
    hist = encode_history(torch.from_numpy(w.ego_history_xyz).float(), ids.history_start,
                          **history_kwargs(cfg.hist_tokenizer))
    prompt = s.prompt_ids[i]
    in_history_bins = (prompt >= ids.history_start) & (prompt < ids.traj_end)
    assert torch.equal(prompt[in_history_bins], hist.to(prompt.dtype))
    assert s.prompt_ids[i][-1] == ids.cot_start
    assert s.target_ids[i][-2:] == [ids.cot_end, ids.traj_future_start]
    assert tok.decode(s.target_ids[i][:-2]).strip() == w.label == s.labels[i]
    # The ground-truth action integrates back to the future poses.
    traj = UnicycleActionSpace(cfg.action_space).action_to_trajectory(
        s.action[i].double(), s.hist_xyz[i], s.hist_rot[i])
    ade = (traj.xyz[:, :2] - s.fut_xyz[i][:, :2]).norm(dim=-1).mean()
    assert float(ade) < 0.2
    # Frames shared by overlapping windows are stored once; runs group consecutive windows.
    assert len(s.frames) < 16 * len(s)
    assert s.runs(4) == [list(range(10))]


def test_sample_sets_concatenate(samples):
    s = SampleSet.load(samples)
    both = SampleSet.concat([s, s])
    assert len(both) == 2 * len(s) and len(both.clip_ids) == 2
    assert torch.equal(both.images([len(s) + 2]), s.images([2]))
    assert both.runs(4) == [list(range(10)), list(range(10, 20))]


# ---------------------------------------------------------------------------------- trainer pieces
def test_training_cache_backpropagates_and_matches_the_static_cache():
    model = create_tiny(0)
    cfg = model.cfg
    T = 12
    pos = extend_positions(torch.zeros(3, 0, dtype=torch.long), T)
    emb = model.embed(torch.randint(0, 1000, (2, T)))
    slots = torch.arange(T)
    ref, _ = model.language_model(emb, StaticKVCache.for_config(cfg.text, 2, T, pos), slots, causal_mask(slots, T), T)
    cache = train.TrainingKVCache.for_config(cfg.text, 2, T, pos)
    out, _ = model.language_model(emb, cache, slots, causal_mask(slots, T), T)
    torch.testing.assert_close(out, ref)
    out.square().mean().backward()  # the engine's in-place cache cannot do this
    assert model.language_model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_batched_deepstack_equals_the_text_models_own_injection():
    model = create_tiny(0)
    T, n_vis = 10, 4
    visual = torch.zeros(T, dtype=torch.bool)
    visual[3:7] = True
    pos = extend_positions(torch.zeros(3, 0, dtype=torch.long), T)
    emb = model.embed(torch.randint(0, 1000, (1, T)))
    deep = [torch.randn(n_vis, 128) for _ in range(3)]
    slots = torch.arange(T)
    lm = model.language_model
    ref, _ = lm(emb, StaticKVCache.for_config(lm.cfg, 1, T, pos), slots, causal_mask(slots, T), T,
                visual_pos_mask=visual, deepstack=deep)
    with train.batched_deepstack(lm, visual, [d[None] for d in deep]):
        out, _ = lm(emb, StaticKVCache.for_config(lm.cfg, 1, T, pos), slots, causal_mask(slots, T), T)
    torch.testing.assert_close(out, ref)
    assert not lm.layers[0]._forward_hooks  # hooks are removed afterwards


def test_flow_times_follow_the_alpamayo_schedule():
    t = train.flow_times(20000, torch.Generator().manual_seed(0), "cpu")
    assert 0.0 <= float(t.min()) and float(t.max()) <= 0.999
    # t = 0.999 (1 - Beta(1.5, 1)): mean 0.999 * 0.4
    assert abs(float(t.mean()) - 0.3996) < 0.01


# ---------------------------------------------------------------------------------- smoke runs
def _fixed_losses(model, samples_path, cfg, tok):
    s = SampleSet.load(samples_path)
    batch = train.Batcher(s, token_ids(cfg, tok), cfg, "cpu")([0, 5])
    with torch.no_grad():
        losses = train.batch_losses(model, batch, torch.Generator().manual_seed(0), flow_repeats=8)
    return float(losses["ce"]), float(losses["flow"])


def test_train_smoke_run_reduces_both_losses_on_a_repeated_batch(samples, cfg_tok, tmp_path):
    cfg, tok = cfg_tok
    ce0, flow0 = _fixed_losses(create_tiny(0), samples, cfg, tok)
    result = train.main(["--data", str(samples), "--heldout", str(samples), "--out", str(tmp_path / "ckpt"),
                         "--steps", "5", "--seed", "0", "--batch-size", "2", "--lr", "3e-3", "--warmup", "1",
                         "--overfit", "--eval-every", "5", "--eval-windows", "2", "--no-progress",
                         "--device", "cpu"])
    hist = result["history"]
    assert all(np.isfinite([h["ce"], h["flow"]]).all() for h in hist)
    assert hist[-1]["ce"] < hist[0]["ce"]
    # Same batch, same noise: both terms went down.
    model = load_model(tmp_path / "ckpt", torch.float32, "cpu")
    ce1, flow1 = _fixed_losses(model, samples, cfg, tok)
    assert ce1 < ce0 and flow1 < flow0
    ev = result["eval"]
    assert 0.0 <= ev["token_acc"] <= 1.0 and np.isfinite(ev["ade"]) and np.isfinite(ev["ade_cv"])
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file() and (tmp_path / "ckpt" / "train_log.jsonl").is_file()


def test_streaming_finetune_changes_only_the_expert_and_projections(samples, tmp_path):
    init = tmp_path / "init"
    from flashdrive_ros.engine.loader import TINY_DIR, save_model
    save_model(create_tiny(0), init, tokenizer_dir=TINY_DIR)
    before = load_model(init, torch.float32, "cpu").state_dict()
    result = streaming_finetune.main(
        ["--init", str(init), "--data", str(samples), "--out", str(tmp_path / "ft"), "--steps", "2",
         "--batch-size", "1", "--flow-repeats", "2", "--min-rollout", "2", "--max-rollout", "3",
         "--max-new-tokens", "3", "--lr", "1e-3", "--warmup", "1", "--device", "cpu"])
    assert all(np.isfinite(h["flow"]) for h in result["history"] if "flow" in h)
    after = load_model(tmp_path / "ft", torch.float32, "cpu").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "fine-tuning changed nothing"
    assert all(k.startswith(streaming_finetune.TRAINABLE) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("expert.") for k in changed)
    assert any(k.startswith("action_in_proj.") for k in changed)
