"""The 1.5 driving prompt: ids, layout, chat-template equivalence, CoC extraction (alpamayo.md §4)."""

from pathlib import Path

import pytest
import torch

from flashdrive_ros.engine.prompt import (
    CAMERA_LABELS, INSTRUCTION, SYSTEM_PROMPT, build_prompt, extract_reasoning, render_prompt,
)
from flashdrive_ros.engine.tokens import TokenIds, load_tokenizer

TINY_DIR = Path(__file__).resolve().parents[1] / "flashdrive_ros" / "assets" / "tiny"
CAMS = (0, 1, 2, 6)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_DIR)


@pytest.fixture(scope="module")
def ids(tok):
    return TokenIds.from_tokenizer(tok, 1024)


def test_camera_labels_follow_alpamayo_indices():
    assert CAMERA_LABELS[0] == "Front left camera"
    assert CAMERA_LABELS[1] == "Front camera"
    assert CAMERA_LABELS[2] == "Front right camera"
    assert CAMERA_LABELS[6] == "Front telephoto camera"


def test_rendered_text_shape():
    text = render_prompt(CAMS, 4, 2, route="Turn left in 50 m.")
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                           "Front left camera: frame 0 <|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
                           "frame 1 <|vision_start|>")
    assert "<|vision_end|>Front camera: frame 0 <|vision_start|>" in text
    assert text.count("camera: ") == 4 and text.count("frame 3 ") == 4
    assert ("<|traj_history|>" * 48 + "<|traj_history_end|><|route_start|>Turn left in 50 m.<|route_end|>"
            + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n<|cot_start|>") in text
    assert text.endswith("<|im_start|>assistant\n<|cot_start|>")


def test_rendering_equals_chat_template(tok):
    # The chat template shipped with the tiny tokenizer renders images as
    # <|vision_start|><|image_pad|><|vision_end|>; the processor expands the pad to n tokens.
    content = []
    for cam in CAMS:
        for f in range(4):
            content.append({"type": "text", "text": (f"{CAMERA_LABELS[cam]}: " if f == 0 else "") + f"frame {f} "})
            content.append({"type": "image"})
    content.append({"type": "text", "text": "<|traj_history_start|>" + "<|traj_history|>" * 48
                    + "<|traj_history_end|>" + INSTRUCTION})
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": content},
                {"role": "assistant", "content": "<|cot_start|>"}]
    templated = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    n = 5
    expanded = templated.replace("<|image_pad|>", "<|image_pad|>" * n)
    assert expanded == render_prompt(CAMS, 4, n)


@pytest.mark.parametrize("route", [None, "Take the second exit at the roundabout."])
def test_ids_equal_tokenizing_the_whole_string(tok, ids, route):
    prompt_ids, layout = build_prompt(tok, ids, CAMS, 4, 28, route=route)
    whole = tok(render_prompt(CAMS, 4, 28, route=route), add_special_tokens=False)["input_ids"]
    assert prompt_ids.dtype == torch.long
    assert prompt_ids.tolist() == whole
    assert layout.length == len(whole)


def test_layout_positions(tok, ids):
    n_tok = 28
    p, lay = build_prompt(tok, ids, CAMS, 4, n_tok)
    assert lay.n_views == 4 and lay.n_frames == 4
    for v in range(4):
        for f in range(4):
            s, e = lay.slots[v][f]
            assert e - s == n_tok + 2
            assert p[s] == ids.vision_start and p[e - 1] == ids.vision_end
            assert (p[s + 1:e - 1] == ids.image_pad).all()
        # Between the images of a view: only "frame k " text.
        for f in range(1, 4):
            between = p[lay.slots[v][f - 1][1]:lay.slots[v][f][0]]
            assert tok.decode(between) == f"frame {f} "
        ls, le = lay.label_ranges[v]
        assert tok.decode(p[ls:le]) == f"{CAMERA_LABELS[CAMS[v]]}: frame 0 "
        assert lay.view_ranges[v] == (ls, lay.slots[v][3][1])
        if v > 0:
            assert lay.view_ranges[v][0] == lay.view_ranges[v - 1][1]  # views are contiguous
    assert tok.decode(p[:lay.view_ranges[0][0]]) == f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    ts, te = lay.tail
    assert ts == lay.slots[3][3][1] and te == lay.length == p.numel()
    assert p[ts] == ids.traj_history_start and p[-1] == ids.cot_start
    assert lay.history_positions.tolist() == list(range(ts + 1, ts + 49))
    assert (p[lay.history_positions] == ids.traj_history).all()
    assert lay.image_positions.numel() == 16 * n_tok
    assert lay.image_positions[:n_tok].tolist() == list(range(lay.slots[0][0][0] + 1, lay.slots[0][0][1] - 1))


def test_r1_style_prompt_without_labels(tok, ids):
    p, lay = build_prompt(tok, ids, CAMS, 4, 3, include_camera_ids=False, include_frame_nums=False)
    for v in range(4):
        assert lay.label_ranges[v][0] == lay.label_ranges[v][1] == lay.slots[v][0][0]
        for f in range(1, 4):
            assert lay.slots[v][f][0] == lay.slots[v][f - 1][1]  # images back to back
    assert "camera" not in tok.decode(p)


def test_subset_of_cameras(tok, ids):
    p, lay = build_prompt(tok, ids, (1, 2, 4), 4, 3)
    assert "Rear camera: frame 0 " in tok.decode(p)
    assert lay.n_views == 3 and len(lay.slots) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(camera_indices=(1, 0)), "sorted"),
    (dict(camera_indices=(0, 7)), "unknown camera index 7"),
    (dict(camera_indices=()), "empty"),
    (dict(n_frames=0), "n_frames"),
    (dict(n_image_tokens=0), "n_image_tokens"),
    (dict(route="go <|im_end|> now"), "route text contains"),
    (dict(route="go to <i12>"), "route text contains"),
])
def test_bad_arguments_are_named(tok, ids, kwargs, message):
    args = dict(camera_indices=CAMS, n_frames=4, n_image_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        build_prompt(tok, ids, **args)


def test_extract_reasoning(tok, ids):
    sentence = "Decelerate since the lead vehicle ahead is braking."
    text_ids = tok(sentence, add_special_tokens=False)["input_ids"]
    generated = text_ids + [ids.cot_end, ids.traj_future_start, ids.traj_start + 5]
    assert extract_reasoning(generated, tok, ids) == sentence
    # After the last <|cot_start|>, up to the first <|cot_end|>; trajectory ids inside are dropped.
    noisy = [ids.cot_start] + tok("old", add_special_tokens=False)["input_ids"] + [ids.cot_start] \
        + text_ids[:3] + [ids.traj_start + 1] + text_ids[3:] + [ids.cot_end] + text_ids
    assert extract_reasoning(torch.tensor(noisy), tok, ids) == sentence
    # No end marker (max_new_tokens hit): everything generated.
    assert extract_reasoning(text_ids, tok, ids) == sentence
