"""Ego-history delta tokenizer (alpamayo.md §5)."""

import numpy as np
import pytest
import torch

from flashdrive_ros.engine.history import decode_history, encode_history, history_kwargs

HIST0 = 1024 + 3000  # tiny history_start id
STEP = torch.tensor([8.0, 8.0, 20.0]) / 999  # bin width per axis with the default range


def _straight_history(speed=10.0, dt=0.1, n=16):
    """Driving straight along +x, last pose at the origin."""
    x = -speed * dt * torch.arange(n - 1, -1, -1, dtype=torch.float32)
    return torch.stack([x, torch.zeros(n), torch.zeros(n)], dim=-1)


def test_straight_history_tokens():
    xyz = _straight_history(speed=10.0)
    ids = encode_history(xyz, HIST0)
    assert ids.shape == (48,) and ids.dtype == torch.long
    bins = (ids - HIST0).view(16, 3)
    # First delta is the oldest position (-15 m in x): clamped to bin 0. Later deltas +1 m in x.
    assert bins[0].tolist() == [0, round(4 / 8 * 999), round(10 / 20 * 999)]
    assert bins[1:, 0].tolist() == [round(5 / 8 * 999)] * 15
    assert (bins[1:, 1] == round(4 / 8 * 999)).all() and (bins[1:, 2] == 500).all()


def test_round_trip_within_half_a_bin_per_step():
    g = torch.Generator().manual_seed(0)
    deltas = (torch.rand(3, 16, 3, generator=g) - 0.5) * torch.tensor([6.0, 6.0, 16.0])
    xyz = deltas.cumsum(dim=1)
    ids = encode_history(xyz, HIST0)
    assert ids.shape == (3, 48)
    back = decode_history(ids, HIST0)
    err_deltas = (torch.diff(back, dim=1, prepend=torch.zeros(3, 1, 3)) - deltas).abs()
    assert (err_deltas <= STEP / 2 + 1e-5).all()


def test_config_range_and_bins_are_used():
    class Hist:  # duck-typed config.HistoryTokenizerConfig
        num_bins = 11
        ego_xyz_min = (-1.0, -1.0, -1.0)
        ego_xyz_max = (1.0, 1.0, 1.0)

    xyz = torch.tensor([[0.2, -0.4, 1.0]] * 16).cumsum(0)
    ids = encode_history(xyz, 0, **history_kwargs(Hist))
    # deltas after the first: (0.2, -0.4, 1.0) -> bins (6, 3, 10) over 11 bins in [-1, 1]
    assert (ids.view(16, 3)[1:] == torch.tensor([6, 3, 10])).all()
    assert ids.max() <= 10


def test_numpy_input_and_errors():
    xyz = _straight_history().numpy()
    assert torch.equal(encode_history(xyz, HIST0), encode_history(torch.from_numpy(xyz), HIST0))
    with pytest.raises(ValueError, match=r"\[..., T, 3\]"):
        encode_history(np.zeros((16, 2)), HIST0)
    with pytest.raises(ValueError, match="NaN"):
        encode_history(np.full((16, 3), np.nan), HIST0)
    with pytest.raises(ValueError, match="must exceed"):
        encode_history(xyz, HIST0, xyz_min=(1, 1, 1), xyz_max=(0, 2, 2))
    with pytest.raises(ValueError, match="outside"):
        decode_history(torch.full((48,), HIST0 - 1), HIST0)
