"""Drafter training pieces: the prefix-weighted loss, sliding blocks, save/load, and that training on
rollouts of the target really raises the teacher-forced accept length (tiny random target, seconds)."""

import math
from types import SimpleNamespace

import torch

from flashdrive_ros.engine.loader import create_tiny
from flashdrive_ros.engine.speculative import (CONFIG_NAME, Drafter, context_features, load_drafter,
                                               save_drafter)
from flashdrive_ros.training.dflash_data import IGNORE, sliding_blocks
from flashdrive_ros.training.train_dflash import (Blocks, evaluate_blocks, position_weights, train,
                                                  weighted_block_loss)

torch.set_num_threads(2)


def test_position_weights_decay_with_gamma_3_and_mean_one():
    w = position_weights(7)
    assert abs(float(w.mean()) - 1) < 1e-6
    assert torch.allclose(w[1:] / w[:-1], torch.full((6,), math.exp(-1 / 3)))


def test_weighted_loss_is_the_weighted_mean_of_valid_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[1, 4:] = IGNORE
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    w = position_weights(7)[None].expand(2, -1) * (labels != IGNORE)
    assert torch.allclose(weighted_block_loss(logits, labels), (ce * w).sum() / w.sum())


def test_sliding_blocks_anchor_context_and_labels():
    # 8 prompt context slots, then generated a b c <cot_end> <traj_future_start>
    tokens = torch.tensor([IGNORE] * 8 + [10, 11, 12, 98, 99])
    blocks = sliding_blocks(tokens, 8)
    assert [j for j, _ in blocks] == [8, 9, 10]          # anchors a, b, c (never <cot_end> / tfs)
    assert blocks[0][1].tolist() == [11, 12, 98, 99] + [IGNORE] * 3
    assert blocks[2][1].tolist() == [98, 99] + [IGNORE] * 5


def test_save_load_roundtrip_has_no_target_weights(tmp_path):
    model = create_tiny(0)
    d = Drafter.for_target(model, seed=1)
    keys = set(d.state_dict())
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys)
    assert all(model.cfg.text.vocab_size not in v.shape for v in d.state_dict().values())
    assert "mask_embedding" in keys and "fc.weight" in keys
    save_drafter(d, tmp_path, extra={"note": 1})
    assert (tmp_path / CONFIG_NAME).is_file()
    e = load_drafter(tmp_path, model)
    ctx = torch.randn(1, 8, len(d.cfg.target_layers) * 128)
    anchor = torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(d.draft_logits(model, anchor, ctx), e.draft_logits(model, anchor, ctx))


def test_drafter_records_its_target_and_warns_on_another_one(tmp_path):
    """target_fingerprint = sha256 of the weights (what `sha256sum model.safetensors` prints);
    load_drafter(target_dir=...) warns, never fails, when the recorded target differs."""
    import hashlib
    import warnings

    import pytest

    from flashdrive_ros.engine.speculative import check_drafter_target, target_fingerprint

    model = create_tiny(0)
    target = tmp_path / "target"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"stage 1 weights")
    fp = target_fingerprint(target)
    assert fp == {"target_sha256": hashlib.sha256(b"stage 1 weights").hexdigest(), "target_weight_bytes": 15}
    d = Drafter.for_target(model, seed=1)
    save_drafter(d, tmp_path / "drafter", extra={**fp})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same target: no warning
        load_drafter(tmp_path / "drafter", model, target_dir=target)
    (target / "model.safetensors").write_bytes(b"stage 2 weights")  # same size, other bytes
    with pytest.warns(UserWarning, match="another target checkpoint"):
        e = load_drafter(tmp_path / "drafter", model, target_dir=target)
    assert all(torch.equal(e.state_dict()[k], v) for k, v in d.state_dict().items())  # still loaded
    (target / "model.safetensors").write_bytes(b"stage 3, longer weights")
    with pytest.warns(UserWarning, match="bytes"):  # another size: caught without hashing
        assert "bytes" in check_drafter_target(tmp_path / "drafter", target)
    save_drafter(d, tmp_path / "old", extra={"note": 1})  # nothing recorded: nothing to compare
    assert check_drafter_target(tmp_path / "old", target) is None


def test_training_on_target_rollouts_fits_and_saves_the_best_drafter(tmp_path):
    """Rollouts = greedy continuations of random prompts by the tiny random target (hidden states
    teacher-forced). A few epochs must lower the prefix-weighted loss on them, and the saved drafter
    is the one with the best validation loss. (Acceptance on held-out windows of the trained tiny
    model is measured by `train_dflash --eval`, docs/SPECULATIVE.md.)"""
    model = create_tiny(0).eval()
    layers = Drafter.for_target(model).cfg.target_layers
    from test_spec_lossless import prefill

    seqs = []
    for seed in range(12):
        prompt = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(seed))
        seq = prompt.clone()
        for _ in range(10):  # greedy continuation, token by token
            _, logits, _ = prefill(model, seq, len(seq))
            seq = torch.cat([seq, logits[0, :1000].argmax()[None]])
        _, _, cap = prefill(model, seq, len(seq), layers)
        feats = context_features(cap, layers)[0, 16 - 8:]
        tokens = torch.cat([torch.full((8,), IGNORE), seq[16:], torch.tensor([5033, 5036])])
        seqs.append({"feats": torch.cat([feats, feats[-2:]]).half(), "tokens": tokens, "n_generated": 10})
    torch.save({"sequences": seqs, "target_layers": list(layers), "weights": "random"}, tmp_path / "ro.pt")
    args = SimpleNamespace(seed=0, device="cpu", rollouts=str(tmp_path / "ro.pt"), model="tiny_random",
                           epochs=8, batch=16, lr=3e-3, out=str(tmp_path / "drafter"))
    import flashdrive_ros.training.train_dflash as td

    orig = td.load_model
    td.load_model = lambda *a, **k: model  # the tiny random target stands in for a checkpoint
    try:
        summary = train(args)
    finally:
        td.load_model = orig
    hist = summary["history"]
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    best = min(h["val_loss"] for h in hist)
    traj = (model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    n_val = len(seqs) // 10
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0)).tolist()
    val = Blocks([seqs[i] for i in order[:n_val]], 8)
    reloaded = evaluate_blocks(load_drafter(tmp_path / "drafter", model), model, val, 256, traj)
    assert abs(reloaded["loss"] - best) < 1e-4
