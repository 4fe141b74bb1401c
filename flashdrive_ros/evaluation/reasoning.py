"""Agreement of generated reasoning (chain of causation) with the label text.

Both strings are normalised the same way before comparison: special tokens such as
`<|cot_start|>` are dropped, text is lower-cased, punctuation becomes whitespace, and the result
is split into words. Exact match compares the word sequences; token F1 is the bag-of-words F1
(SQuAD style: overlap counted with multiplicity).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

_SPECIAL_TOKEN = re.compile(r"<\|[^|>]*\|>|<i\d+>")  # Qwen/Alpamayo specials and trajectory tokens
_NON_WORD = re.compile(r"[^\w]+")  # punctuation (incl. '_' below) splits words


def normalize_words(text: str | None) -> list[str]:
    """Lower-cased words of `text` with special tokens and punctuation removed."""
    if not text:
        return []
    text = unicodedata.normalize("NFKC", text)
    text = _SPECIAL_TOKEN.sub(" ", text).lower()
    text = _NON_WORD.sub(" ", text).replace("_", " ")
    return text.split()


def exact_match(prediction: str | None, reference: str | None) -> float:
    """1.0 when the normalised word sequences are identical, else 0.0."""
    return float(normalize_words(prediction) == normalize_words(reference))


def token_f1(prediction: str | None, reference: str | None) -> float:
    """Bag-of-words F1 between normalised words; two empty texts agree (1.0), one empty gives 0.0."""
    pred, ref = normalize_words(prediction), normalize_words(reference)
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def reasoning_agreement(prediction: str | None, reference: str | None) -> dict | None:
    """{'exact_match', 'token_f1'} or None when there is no label to compare against."""
    if reference is None:
        return None
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference)}
