"""Reasoning agreement: normalised exact match and bag-of-words token F1."""
import pytest

from flashdrive_ros.evaluation.reasoning import exact_match, normalize_words, reasoning_agreement, token_f1


def test_normalisation_drops_special_tokens_case_and_punctuation():
    text = "<|cot_start|>Slow down: the pedestrian's crossing!<|cot_end|><i12>"
    assert normalize_words(text) == ["slow", "down", "the", "pedestrian", "s", "crossing"]
    assert normalize_words(None) == [] and normalize_words("  ") == []


def test_exact_match_compares_normalised_word_sequences():
    assert exact_match("<|cot_start|>Keep lane.<|cot_end|>", "keep   LANE") == 1.0
    assert exact_match("lane keep", "keep lane") == 0.0  # order matters for exact match


def test_token_f1_hand_example():
    # pred 5 words, label 4 words, overlap {slow, down, pedestrian} = 3 -> P 3/5, R 3/4, F1 2/3
    assert token_f1("Slow down for the pedestrian", "slow down, pedestrian crossing") == pytest.approx(2 / 3)
    assert token_f1("lane keep", "keep lane") == pytest.approx(1.0)  # order does not matter for F1


def test_token_f1_counts_repeated_words_once_per_occurrence():
    # overlap of "stop stop stop" with "stop now" is one "stop": P 1/3, R 1/2 -> F1 0.4
    assert token_f1("stop stop stop", "stop now") == pytest.approx(0.4)


def test_empty_texts():
    assert token_f1("", "") == 1.0
    assert token_f1("", "stop") == 0.0 and token_f1("stop", None) == 0.0
    assert reasoning_agreement("anything", None) is None
    assert reasoning_agreement("Stop.", "stop") == {"exact_match": 1.0, "token_f1": 1.0}
