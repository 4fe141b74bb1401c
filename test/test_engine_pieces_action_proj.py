"""action_in_proj / action_out_proj (alpamayo.md §8)."""

import math

import pytest
import torch

from flashdrive_ros.engine.action_proj import ActionInProj, fourier_features, make_action_out_proj


def test_checkpoint_parameter_names_and_shapes():
    m = ActionInProj(2048, hidden_size=512, num_enc_layers=2, num_fourier_feats=20, max_freq=100.0)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "encoder.trunk.0.weight": (512, 60), "encoder.trunk.0.bias": (512,),
        "encoder.trunk.2.weight": (512,),
        "encoder.trunk.3.weight": (512, 512), "encoder.trunk.3.bias": (512,),
        "encoder.trunk.5.weight": (512,),
        "encoder.trunk.6.weight": (2048, 512), "encoder.trunk.6.bias": (2048,),
        "norm.weight": (2048,), "norm.bias": (2048,),
    }
    # 1,349,632 parameters reported for the real action_in_proj.
    assert sum(v.numel() for v in m.state_dict().values()) == 1_349_632
    out = make_action_out_proj(2048)
    assert {k: tuple(v.shape) for k, v in out.state_dict().items()} == {"weight": (2, 2048), "bias": (2,)}


def test_config_object_overrides_kwargs():
    class Cfg:
        hidden_size, num_enc_layers, num_fourier_feats, max_freq = 64, 3, 8, 10.0

    m = ActionInProj(96, Cfg())
    assert m.encoder.trunk[0].in_features == 24
    assert len(m.encoder.trunk) == 3 * 3 + 1
    assert torch.allclose(m.freqs, torch.logspace(0, 1, 4))


def test_fourier_features_formula():
    freqs = torch.logspace(0, 2, 10)
    assert freqs[0] == 1 and torch.isclose(freqs[-1], torch.tensor(100.0))
    x = torch.tensor([0.3])
    f = fourier_features(x, freqs)
    assert f.shape == (1, 20)
    assert torch.allclose(f[0, :10], math.sqrt(2) * torch.sin(2 * math.pi * 0.3 * freqs), atol=1e-4)
    assert torch.allclose(f[0, 10:], math.sqrt(2) * torch.cos(2 * math.pi * 0.3 * freqs), atol=1e-4)


def test_features_layout_accel_curvature_time():
    torch.manual_seed(0)
    m = ActionInProj(32, hidden_size=16)
    a = torch.randn(3, 64, 2)
    t = torch.tensor([0.0, 0.5, 0.9])
    feats = m.features(a, t)
    assert feats.shape == (3, 64, 60)
    assert torch.allclose(feats[..., :20], fourier_features(a[..., 0], m.freqs))
    assert torch.allclose(feats[..., 20:40], fourier_features(a[..., 1], m.freqs))
    assert torch.allclose(feats[1, 7, 40:], fourier_features(torch.tensor(0.5), m.freqs))


def test_forward_matches_explicit_computation():
    torch.manual_seed(0)
    m = ActionInProj(32, hidden_size=16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    a, t = torch.randn(2, 64, 2), torch.tensor([0.1, 0.7])
    tr = m.encoder.trunk

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    h = rms(torch.nn.functional.silu(tr[0](m.features(a, t))), tr[2].weight)
    h = rms(torch.nn.functional.silu(tr[3](h)), tr[5].weight)
    expected = torch.nn.functional.layer_norm(tr[6](h), (32,), m.norm.weight, m.norm.bias)
    out = m(a, t)
    assert out.shape == (2, 64, 32)
    torch.testing.assert_close(out, expected)
    # t as [K, 1] or a scalar broadcast the same way.
    torch.testing.assert_close(m(a, t[:, None]), out)
    torch.testing.assert_close(m(a, 0.7)[1], out[1])


def test_bad_inputs_are_named():
    m = ActionInProj(8, hidden_size=8)
    with pytest.raises(ValueError, match=r"noisy_action must be \[K, W, 2\]"):
        m(torch.zeros(2, 64, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="t must be"):
        m(torch.zeros(2, 64, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="even"):
        ActionInProj(8, num_fourier_feats=5)
