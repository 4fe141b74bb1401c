"""Special tokens, the tiny tokenizer and the id table (alpamayo.md §4, DESIGN.md tiny layout)."""

import re
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from flashdrive_ros.engine.tiny_tokenizer import (
    BASE_VOCAB_SIZE, TINY_VOCAB_SIZE, build_base_tokenizer, build_tiny_tokenizer, save_tiny_tokenizer,
)
from flashdrive_ros.engine.tokens import (
    QWEN_TOKENS, SPECIAL_TOKEN_NAMES, TokenIds, load_tokenizer, special_token, traj_token,
)

TINY_DIR = Path(__file__).resolve().parents[1] / "flashdrive_ros" / "assets" / "tiny"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_DIR)


def test_special_names_follow_reference_order():
    assert len(SPECIAL_TOKEN_NAMES) == 28
    # Anchors reported for the real checkpoint: 155669 + offset.
    anchors = {0: "prompt_start", 5: "traj_history_start", 8: "cot_start", 12: "traj_future_start",
               15: "traj_history", 16: "traj_future", 27: "answer_end"}
    for offset, name in anchors.items():
        assert SPECIAL_TOKEN_NAMES[offset] == name
    assert special_token("cot_start") == "<|cot_start|>"
    assert traj_token(17) == "<i17>"


def test_real_layout_arithmetic_matches_reported_ids():
    # 151669 + 4000 + 28 = 155697, history bins start at 154669, cot_start at 155677.
    base = 151669
    assert base + 4000 + SPECIAL_TOKEN_NAMES.index("cot_start") == 155677
    assert base + 4000 + SPECIAL_TOKEN_NAMES.index("traj_future") == 155685
    assert base + 4000 + len(SPECIAL_TOKEN_NAMES) == 155697


def test_tiny_layout(tok):
    vocab = tok.get_vocab()
    assert len(tok) == TINY_VOCAB_SIZE == 5052
    for t in QWEN_TOKENS:
        assert vocab[t] < BASE_VOCAB_SIZE
    assert sum(1 for i in vocab.values() if i < BASE_VOCAB_SIZE) == BASE_VOCAB_SIZE
    assert vocab["<i0>"] == 1024 and vocab["<i3999>"] == 5023
    assert vocab["<|prompt_start|>"] == 5024 and vocab["<|answer_end|>"] == 5051


def test_token_ids_resolve_and_shortcuts(tok):
    ids = TokenIds.from_tokenizer(tok, 1024)
    assert ids.vocab_size == 5052
    assert ids.history_start == 1024 + 3000
    assert ids.traj_end == 5024
    assert ids.cot_start == tok.convert_tokens_to_ids("<|cot_start|>")
    assert ids.im_start == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.image_pad == tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.traj_token_ids()["future_start"] == ids.traj_future_start
    with pytest.raises(AttributeError, match="no token named"):
        ids.not_a_token


def test_token_ids_mismatch_names_the_token(tok):
    with pytest.raises(ValueError, match=r"'<i0>' has id 1024, expected 1025"):
        TokenIds.from_tokenizer(tok, 1025)
    with pytest.raises(ValueError, match="traj_vocab_size"):
        TokenIds.from_tokenizer(tok, 1024, traj_vocab_size=4000, future_bins=3000, history_bins=999)
    good = TokenIds.from_tokenizer(tok, 1024).traj_token_ids()
    TokenIds.from_tokenizer(tok, 1024, traj_token_ids=good)
    with pytest.raises(ValueError, match=r"traj_token_ids\['history'\]"):
        TokenIds.from_tokenizer(tok, 1024, traj_token_ids={**good, "history": 7})


def test_build_is_deterministic_and_matches_shipped_files(tmp_path):
    save_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (TINY_DIR / name).read_bytes(), name
    assert build_tiny_tokenizer().get_vocab() == build_tiny_tokenizer().get_vocab()


@pytest.mark.parametrize("sentence", [
    "Decelerate since the lead vehicle ahead is braking.",
    "Stop because the traffic light is red.",
    "Accelerate as the light turned green.",
    "Change lane to the left to pass the slow truck.",
    "Yield to the pedestrian crossing the road.",
    "Keep lane because the road curves to the right.",
    "Turn right, then keep the lane.",
])
def test_driving_reasoning_is_whole_words_and_round_trips(tok, sentence):
    ids = tok(sentence, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == sentence
    assert all(i < BASE_VOCAB_SIZE for i in ids)
    # Every word and every punctuation mark is one token.
    assert len(ids) == len(re.findall(r"\w+|[^\w\s]", sentence))


def test_plain_base_tokenizer_gets_tokens_appended(tmp_path):
    # Like the real Qwen3-VL tokenizer: base vocabulary only, the checkpoint ships no tokenizer.
    build_base_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, traj_token_start_idx=1024)
    ids = TokenIds.from_tokenizer(tok, 1024)
    assert len(tok) == 5052 and ids.answer_end == 5051
    assert tok.convert_ids_to_tokens(ids.traj_future_start) == "<|traj_future_start|>"
    with pytest.raises(ValueError, match="traj_token_start_idx=1000"):
        load_tokenizer(tmp_path, traj_token_start_idx=1000)


def test_load_tokenizer_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
