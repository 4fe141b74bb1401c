"""M-RoPE tables and position ids, checked against transformers' Qwen3-VL at the real head size,
and the full 10B shape (built on the meta device) against the parameter count of alpamayo.md §10."""

import pytest
import torch
from transformers import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from flashdrive_ros.engine.config import full_config
from flashdrive_ros.engine.model import AlpamayoModel
from flashdrive_ros.engine.rope import apply_rotary, axis_of_frequency, extend_positions, mrope_cos_sin, rope_index


@pytest.mark.parametrize("head_dim, section", [(128, (24, 20, 20)), (32, (6, 5, 5))])
def test_cos_sin_equal_transformers_interleaved_layout(head_dim, section):
    hf_cfg = Qwen3VLTextConfig(head_dim=head_dim, hidden_size=head_dim * 2, num_attention_heads=2,
                               rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                    mrope_section=list(section), mrope_interleaved=True))
    rot = Qwen3VLTextRotaryEmbedding(hf_cfg)
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 3000, (3, 50), generator=g)
    ref_cos, ref_sin = rot(torch.zeros(1, dtype=torch.float32), positions[:, None])
    cos, sin = mrope_cos_sin(positions, head_dim, 5e6, section)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


def test_frequency_axes_are_interleaved():
    axis = axis_of_frequency(32, (6, 5, 5)).tolist()
    assert axis == [0, 1, 2] * 5 + [0]
    axis = axis_of_frequency(128, (24, 20, 20))
    assert (axis == 0).sum() == 24 and (axis == 1).sum() == 20 and (axis == 2).sum() == 20
    assert axis[60:].tolist() == [0, 0, 0, 0]


def test_rotation_preserves_norm_and_relative_angle():
    x = torch.randn(2, 5, 32)
    same = torch.arange(5).expand(3, -1)
    cos, sin = mrope_cos_sin(same, 32, 1e4, (6, 5, 5))
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # Text positions: q·k depends only on the position difference.
    c1, s1 = mrope_cos_sin(torch.tensor([[3, 7]] * 3), 32, 1e4, (6, 5, 5))
    c2, s2 = mrope_cos_sin(torch.tensor([[10, 14]] * 3), 32, 1e4, (6, 5, 5))
    q, k = torch.randn(32), torch.randn(32)
    d1 = apply_rotary(q, c1[0], s1[0]) @ apply_rotary(k, c1[1], s1[1])
    d2 = apply_rotary(q, c2[0], s2[0]) @ apply_rotary(k, c2[1], s2[1])
    assert torch.allclose(d1, d2, atol=1e-4)


def test_rope_index_image_grid_and_text_after_max_plus_one():
    img = 9
    ids = torch.tensor([1, 2, 8] + [img] * 6 + [8, 5])  # 2 text, start, 2x3 merged image, end, text
    pos, nxt = rope_index(ids, torch.tensor([[1, 4, 6]]), img, 2)
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 3:9].tolist() == [3] * 6                       # t
    assert pos[1, 3:9].tolist() == [3, 3, 3, 4, 4, 4]             # h (rows)
    assert pos[2, 3:9].tolist() == [3, 4, 5, 3, 4, 5]             # w (cols)
    assert pos[:, 9:].tolist() == [[6, 7]] * 3                    # max + 1 = 6
    assert nxt == 8
    ext = extend_positions(pos, 14)
    assert ext[:, 11:].tolist() == [[8, 9, 10]] * 3


def test_rope_index_refuses_mismatched_grids():
    img = 9
    ids = torch.tensor([1] + [img] * 6 + [2])
    with pytest.raises(ValueError, match="needs 24 consecutive image tokens"):
        rope_index(ids, torch.tensor([[1, 8, 12]]), img, 2)
    with pytest.raises(ValueError, match="more image-token runs"):
        rope_index(ids, None, img, 2)
    with pytest.raises(ValueError, match="2 image grids given but 1"):
        rope_index(ids, torch.tensor([[1, 4, 6], [1, 4, 6]]), img, 2)
    with pytest.raises(ValueError, match="1-D"):
        rope_index(ids[None], None, img, 2)


def test_full_shape_parameter_count_matches_the_checkpoint():
    with torch.device("meta"):
        model = AlpamayoModel(full_config())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Vision tower, from the shapes of §2: patch conv 1536*1152+1152, pos-embed 2304*1152,
    # 27 blocks of 15,239,504, merger 40,119,040, 3 deepstack mergers of 40,125,952.
    # (alpamayo.md §10's table says 576,384,496: its arithmetic is 3,840 short of this sum.)
    assert count(model.visual) == 1_770_624 + 2_654_208 + 27 * 15_239_504 + 40_119_040 + 3 * 40_125_952
    assert count(model.language_model) + count(model.vlm.lm_head) == 8_221_545_472
    assert count(model.expert) == 2_279_238_656
    assert count(model.action_in_proj) == 1_349_632
    assert count(model.action_out_proj) == 4_098
    assert count(model) == 11_078_522_354 + 3_840
