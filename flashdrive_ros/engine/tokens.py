"""Special-token names and the id table the pipeline uses (alpamayo.md §4).

Ids are never hard-coded: they are resolved from a tokenizer plus the config's
`traj_token_start_idx`, and checked against the fixed Alpamayo layout

    [base vocabulary][<i0> .. <i{traj_vocab-1}>][28 Alpamayo specials]

The real model has base 151,669 (Qwen3-VL), the tiny preset base 1,024; the layout is the same.
The trajectory block is split into future bins [traj_start, traj_start + future_bins) followed by
history bins [traj_start + future_bins, traj_start + future_bins + history_bins).

Public API
----------
SPECIAL_TOKEN_NAMES      the 28 Alpamayo special names in id order
QWEN_TOKENS              the Qwen special tokens every base vocabulary must contain
special_token(name)      "<|name|>"
traj_token(k)            "<ik>"
TokenIds.from_tokenizer(tokenizer, traj_token_start_idx, ...)   resolved + checked id table
add_alpamayo_tokens(tokenizer, traj_vocab_size)   extend a plain Qwen tokenizer in the reference order
load_tokenizer(directory, traj_token_start_idx=None, traj_vocab_size=4000)   local files only
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

# The 1.5 names; R1 used other names for some paddings (image_pre_tkn, meta_action_start, vectorized_wm*)
# but the ids are identical, so only the 1.5 spelling is kept.
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (
    "prompt_start",
    "prompt_end",
    "image_start",
    "padding_0",
    "image_end",
    "traj_history_start",
    "padding_1",
    "traj_history_end",
    "cot_start",
    "cot_end",
    "padding_2",
    "padding_3",
    "traj_future_start",
    "padding_4",
    "traj_future_end",
    "traj_history",
    "traj_future",
    "padding_5",
    "padding_6",
    "padding_7",
    "padding_8",
    "route_start",
    "route_pad",
    "route_end",
    "question_start",
    "question_end",
    "answer_start",
    "answer_end",
)
assert len(SPECIAL_TOKEN_NAMES) == 28

# Qwen chat / vision tokens that the base vocabulary must already contain.
QWEN_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# config.json `traj_token_ids` keys (base_model.py convention) -> special name.
TRAJ_TOKEN_ID_KEYS: dict[str, str] = {
    "history": "traj_history",
    "future": "traj_future",
    "history_start": "traj_history_start",
    "future_start": "traj_future_start",
    "history_end": "traj_history_end",
    "future_end": "traj_future_end",
}

DEFAULT_TRAJ_VOCAB_SIZE = 4000
DEFAULT_FUTURE_BINS = 3000
DEFAULT_HISTORY_BINS = 1000


def special_token(name: str) -> str:
    """`<|name|>` for one of SPECIAL_TOKEN_NAMES (or any Qwen name such as 'im_start')."""
    return f"<|{name}|>"


def traj_token(k: int) -> str:
    """The k-th discrete trajectory token `<ik>`."""
    return f"<i{k}>"


@dataclass(frozen=True, eq=False)
class TokenIds:
    """Every id the pipeline needs, resolved from a tokenizer and verified against the layout.

    Attributes: traj_start, traj_vocab_size, future_bins, history_bins, base_size (= traj_start),
    vocab_size, `special` (name -> id for the 28 Alpamayo tokens), `qwen` (token string -> id),
    and shortcuts for the ids used on hot paths (cot_start, traj_future_start, image_pad, ...).
    """

    traj_start: int
    traj_vocab_size: int
    future_bins: int
    history_bins: int
    special: Mapping[str, int] = field(repr=False)
    qwen: Mapping[str, int] = field(repr=False)

    # ---- derived ranges ----
    @property
    def base_size(self) -> int:
        return self.traj_start

    @property
    def traj_end(self) -> int:
        """One past the last trajectory id."""
        return self.traj_start + self.traj_vocab_size

    @property
    def history_start(self) -> int:
        """Id of history bin 0 (`<i{future_bins}>`)."""
        return self.traj_start + self.future_bins

    @property
    def vocab_size(self) -> int:
        return self.traj_end + len(SPECIAL_TOKEN_NAMES)

    # ---- shortcuts ----
    def __getattr__(self, name: str) -> int:
        # Lets callers write ids.cot_start, ids.traj_future_start, ids.im_start, ids.image_pad ...
        special = self.__dict__.get("special", {})
        if name in special:
            return special[name]
        qwen = self.__dict__.get("qwen", {})
        if special_token(name) in qwen:
            return qwen[special_token(name)]
        raise AttributeError(f"TokenIds has no token named {name!r}")

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        traj_token_start_idx: int,
        traj_vocab_size: int = DEFAULT_TRAJ_VOCAB_SIZE,
        future_bins: int = DEFAULT_FUTURE_BINS,
        history_bins: int = DEFAULT_HISTORY_BINS,
        traj_token_ids: Mapping[str, int] | None = None,
    ) -> "TokenIds":
        """Resolve and check all ids.

        tokenizer: anything with `get_vocab()` (transformers tokenizer or `tokenizers.Tokenizer`).
        traj_token_start_idx: config value (151669 real, 1024 tiny).
        traj_token_ids: optional config dict {"history": id, "future_start": id, ...} to cross-check.
        Raises ValueError naming the first token whose id disagrees with the layout.
        """
        if future_bins + history_bins != traj_vocab_size:
            raise ValueError(
                f"future_bins ({future_bins}) + history_bins ({history_bins}) must equal "
                f"traj_vocab_size ({traj_vocab_size})"
            )
        vocab = tokenizer.get_vocab()

        def expect(token: str, wanted: int) -> None:
            got = vocab.get(token)
            if got != wanted:
                raise ValueError(
                    f"tokenizer disagrees with the Alpamayo layout: token {token!r} has id {got}, "
                    f"expected {wanted} (traj_token_start_idx={traj_token_start_idx})"
                )

        # Every trajectory token sits at its fixed offset (cheap: one dict lookup each).
        for k in range(traj_vocab_size):
            expect(traj_token(k), traj_token_start_idx + k)
        special = {}
        for i, name in enumerate(SPECIAL_TOKEN_NAMES):
            wanted = traj_token_start_idx + traj_vocab_size + i
            expect(special_token(name), wanted)
            special[name] = wanted

        qwen = {}
        for token in QWEN_TOKENS:
            got = vocab.get(token)
            if got is None:
                raise ValueError(f"tokenizer lacks the Qwen token {token!r}")
            if got >= traj_token_start_idx:
                raise ValueError(f"Qwen token {token!r} has id {got}, inside the trajectory/special range")
            qwen[token] = got

        if traj_token_ids is not None:
            for key, wanted in traj_token_ids.items():
                if key not in TRAJ_TOKEN_ID_KEYS:
                    raise ValueError(f"unknown traj_token_ids key {key!r}; known: {sorted(TRAJ_TOKEN_ID_KEYS)}")
                name = TRAJ_TOKEN_ID_KEYS[key]
                if special[name] != int(wanted):
                    raise ValueError(
                        f"config traj_token_ids[{key!r}] = {wanted} but {special_token(name)} "
                        f"has id {special[name]} in the tokenizer"
                    )
        return cls(traj_start=traj_token_start_idx, traj_vocab_size=traj_vocab_size,
                   future_bins=future_bins, history_bins=history_bins, special=special, qwen=qwen)

    def traj_token_ids(self) -> dict[str, int]:
        """The config.json `traj_token_ids` dict for this table."""
        return {key: self.special[name] for key, name in TRAJ_TOKEN_ID_KEYS.items()}


def add_alpamayo_tokens(tokenizer, traj_vocab_size: int = DEFAULT_TRAJ_VOCAB_SIZE) -> int:
    """Append `<i0>..` then the 28 specials to a transformers tokenizer, in the reference order.

    Mirrors what the reference does at load time (plain tokens for the trajectory bins, special
    tokens for the 28). Returns the id of `<i0>`. Refuses a tokenizer that has only part of them.
    """
    vocab = tokenizer.get_vocab()
    present = [t for t in (traj_token(0), special_token(SPECIAL_TOKEN_NAMES[0])) if t in vocab]
    if present:
        raise ValueError(f"tokenizer already contains {present[0]!r}; not adding Alpamayo tokens twice")
    start = len(tokenizer)
    added = tokenizer.add_tokens([traj_token(k) for k in range(traj_vocab_size)])
    if added != traj_vocab_size:
        raise ValueError(f"added {added} of {traj_vocab_size} trajectory tokens (some already existed)")
    added = tokenizer.add_tokens([special_token(n) for n in SPECIAL_TOKEN_NAMES], special_tokens=True)
    if added != len(SPECIAL_TOKEN_NAMES):
        raise ValueError(f"added {added} of {len(SPECIAL_TOKEN_NAMES)} Alpamayo special tokens")
    return start


def load_tokenizer(directory: str | Path, traj_token_start_idx: int | None = None,
                   traj_vocab_size: int = DEFAULT_TRAJ_VOCAB_SIZE):
    """Load a fast tokenizer from local files (never the network).

    If the tokenizer has no `<i0>` (a plain Qwen3-VL tokenizer: the checkpoint ships none), the
    trajectory and special tokens are appended; `<i0>` must then land on `traj_token_start_idx`
    when that is given. Verify the full table with `TokenIds.from_tokenizer` afterwards.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, OSError, KeyError):
        # A bare tokenizer.json (no or unknown tokenizer_config.json) still loads this way.
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    if traj_token(0) not in tokenizer.get_vocab():
        start = add_alpamayo_tokens(tokenizer, traj_vocab_size)
        if traj_token_start_idx is not None and start != traj_token_start_idx:
            raise ValueError(
                f"after adding trajectory tokens to {directory}, <i0> has id {start} but the config "
                f"says traj_token_start_idx={traj_token_start_idx} (wrong base tokenizer?)"
            )
    return tokenizer
