"""The Alpamayo 1.5 driving prompt as token ids, plus where everything sits (alpamayo.md §4).

Rendered text (Qwen3-VL chat format, assistant turn left open):

    <|im_start|>system\\n{SYSTEM_PROMPT}<|im_end|>\\n<|im_start|>user\\n
    Front left camera: frame 0 <|vision_start|><|image_pad|>*n<|vision_end|>frame 1 <|vision_start|>...
    Front camera: frame 0 <|vision_start|>...<|vision_end|>...
    <|traj_history_start|><|traj_history|>*48<|traj_history_end|>[<|route_start|>route<|route_end|>]
    {INSTRUCTION}<|im_end|>\\n<|im_start|>assistant\\n<|cot_start|>

(no line breaks between the user parts). Ids are produced by encoding each text run between two
special tokens separately, which is exactly what a tokenizer does with the whole string (added
tokens split the input first), and lets us record positions without searching.

Public API
----------
CAMERA_LABELS, SYSTEM_PROMPT, INSTRUCTION
render_prompt(camera_indices, n_frames, n_image_tokens, route=None, ...) -> str
build_prompt(tokenizer, token_ids, camera_indices, n_frames, n_image_tokens, route=None, ...)
    -> (ids LongTensor [L], PromptLayout)
extract_reasoning(generated_ids, tokenizer, token_ids) -> str     (the CoC text)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

SYSTEM_PROMPT = "You are a driving assistant that generates safe and accurate actions."
INSTRUCTION = "output the chain-of-thought reasoning of the driving process, then output the future trajectory."
HISTORY_TOKENS = 48  # 16 poses x (dx, dy, dz)

# Alpamayo camera index -> 1.5 prompt label (alpamayo.md §3).
CAMERA_LABELS: dict[int, str] = {
    0: "Front left camera",
    1: "Front camera",
    2: "Front right camera",
    3: "Rear left camera",
    4: "Rear camera",
    5: "Rear right camera",
    6: "Front telephoto camera",
}

_FORBIDDEN_IN_TEXT = re.compile(r"<\|[a-z_0-9]+\|>|<i\d+>")

Range = tuple[int, int]  # [start, end)


@dataclass(frozen=True)
class PromptLayout:
    """Token positions inside the prompt (all ranges are [start, end)).

    slots[v][f]      image block of view v, frame f: [<|vision_start|>, <|vision_end|> + 1)
    label_ranges[v]  text tokens before view v's first image (camera label + "frame 0 ")
    view_ranges[v]   the whole block of view v: label through its last <|vision_end|>
    tail             [last <|vision_end|> + 1, length): history, route, instruction, assistant turn
    history_positions  LongTensor [48], positions of the <|traj_history|> placeholders
    image_positions    LongTensor [n_views * n_frames * n_image_tokens], all <|image_pad|> positions
                       in image order (view-major, frame-minor)
    length           prompt length; the last token is <|cot_start|>
    """

    camera_indices: tuple[int, ...]
    n_frames: int
    n_image_tokens: int
    slots: tuple[tuple[Range, ...], ...]
    label_ranges: tuple[Range, ...]
    view_ranges: tuple[Range, ...]
    tail: Range
    history_positions: torch.Tensor
    image_positions: torch.Tensor
    length: int

    @property
    def n_views(self) -> int:
        return len(self.camera_indices)


# ---------------------------------------------------------------- rendering
def _check_args(camera_indices: Sequence[int], n_frames: int, n_image_tokens: int, route: str | None) -> None:
    cams = list(camera_indices)
    if not cams:
        raise ValueError("camera_indices is empty")
    unknown = [c for c in cams if c not in CAMERA_LABELS]
    if unknown:
        raise ValueError(f"unknown camera index {unknown[0]}; Alpamayo indices are 0..6")
    if cams != sorted(set(cams)):
        raise ValueError(f"camera_indices must be unique and sorted by Alpamayo index, got {cams}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if n_image_tokens < 1:
        raise ValueError(f"n_image_tokens must be >= 1, got {n_image_tokens}")
    if route is not None and _FORBIDDEN_IN_TEXT.search(route):
        raise ValueError(f"route text contains a special/trajectory token: {_FORBIDDEN_IN_TEXT.search(route)[0]!r}")


def _pieces(camera_indices, n_frames, n_image_tokens, route, include_camera_ids, include_frame_nums):
    """The prompt as a list of (kind, value, tag): kind 'text' or 'special' (value = special name).

    tag marks where a piece belongs: ('label', v), ('image', v, f) for the image block pieces, or None.
    """
    p = []

    def text(s, tag=None):
        p.append(("text", s, tag))

    def special(name, tag=None):
        p.append(("special", name, tag))

    special("im_start")
    text("system\n" + SYSTEM_PROMPT)
    special("im_end")
    text("\n")
    special("im_start")
    text("user\n")
    for v, cam in enumerate(camera_indices):
        for f in range(n_frames):
            words = ""
            if include_camera_ids and f == 0:
                words += f"{CAMERA_LABELS[cam]}: "
            if include_frame_nums:
                words += f"frame {f} "
            # Always record the view start even when there is no text (R1 style prompt).
            text(words, ("label", v) if f == 0 else None)
            special("vision_start", ("image", v, f))
            for _ in range(n_image_tokens):
                special("image_pad", ("image", v, f))
            special("vision_end", ("image", v, f))
    special("traj_history_start")
    for _ in range(HISTORY_TOKENS):
        special("traj_history")
    special("traj_history_end")
    if route is not None:
        special("route_start")
        text(route)
        special("route_end")
    text(INSTRUCTION)
    special("im_end")
    text("\n")
    special("im_start")
    text("assistant\n")
    special("cot_start")
    return p


def render_prompt(camera_indices: Sequence[int], n_frames: int, n_image_tokens: int, route: str | None = None,
                  include_camera_ids: bool = True, include_frame_nums: bool = True) -> str:
    """The prompt as one string (what the chat template + image-pad expansion produce)."""
    _check_args(camera_indices, n_frames, n_image_tokens, route)
    return "".join(v if kind == "text" else f"<|{v}|>"
                   for kind, v, _ in _pieces(camera_indices, n_frames, n_image_tokens, route,
                                             include_camera_ids, include_frame_nums))


# ---------------------------------------------------------------- ids + layout
def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise TypeError(f"need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return backend


def _special_id(token_ids, name: str) -> int:
    try:
        return getattr(token_ids, name)
    except AttributeError:
        raise ValueError(f"token table has no id for <|{name}|>") from None


def build_prompt(tokenizer, token_ids, camera_indices: Sequence[int], n_frames: int, n_image_tokens: int,
                 route: str | None = None, include_camera_ids: bool = True,
                 include_frame_nums: bool = True) -> tuple[torch.Tensor, PromptLayout]:
    """Token ids [L] (int64) and the PromptLayout of the driving prompt.

    tokenizer: fast tokenizer (transformers or `tokenizers.Tokenizer`), used for the text runs only.
    token_ids: tokens.TokenIds (special ids come from it, never from literals).
    camera_indices: Alpamayo indices, sorted (default set (0, 1, 2, 6)).
    n_image_tokens: LLM tokens per image (180 real, 28 tiny) = grid_h * grid_w / 4.
    The 48 history placeholders are `<|traj_history|>`; scatter history.encode_history() ids into
    `layout.history_positions` before prefill.
    """
    _check_args(camera_indices, n_frames, n_image_tokens, route)
    cams = tuple(camera_indices)
    pieces = _pieces(cams, n_frames, n_image_tokens, route, include_camera_ids, include_frame_nums)
    backend = _backend(tokenizer)

    # Merge consecutive text pieces into runs; remember each piece's character span inside its run
    # so tagged pieces can be located in token space via offsets.
    ids: list[int] = []
    tag_start: dict = {}  # tag -> first token position
    tag_end: dict = {}  # tag -> one past last token position
    i = 0
    while i < len(pieces):
        kind, value, tag = pieces[i]
        if kind == "special":
            if tag is not None:
                tag_start.setdefault(tag, len(ids))
                tag_end[tag] = len(ids) + 1
            ids.append(_special_id(token_ids, value))
            i += 1
            continue
        run, char_tags = "", []
        while i < len(pieces) and pieces[i][0] == "text":
            _, s, t = pieces[i]
            char_tags.append((len(run), t))
            run += s
            i += 1
        base = len(ids)
        if run:
            enc = backend.encode(run, add_special_tokens=False)
            ids.extend(enc.ids)
            offsets = enc.offsets
        else:
            offsets = []
        for char_pos, t in char_tags:
            if t is None:
                continue
            # First token starting at or after the tagged piece (pre-tokens never start mid-word
            # at a label boundary); an empty piece starts where the run's next token would.
            first = next((k for k, (s, _) in enumerate(offsets) if s >= char_pos), len(offsets))
            tag_start.setdefault(t, base + first)

    n_views = len(cams)
    slots = tuple(tuple((tag_start[("image", v, f)], tag_end[("image", v, f)]) for f in range(n_frames))
                  for v in range(n_views))
    label_ranges = tuple((tag_start[("label", v)], slots[v][0][0]) for v in range(n_views))
    view_ranges = tuple((label_ranges[v][0], slots[v][-1][1]) for v in range(n_views))
    ids_t = torch.tensor(ids, dtype=torch.long)
    history_positions = torch.nonzero(ids_t == token_ids.traj_history).flatten()
    image_positions = torch.nonzero(ids_t == token_ids.image_pad).flatten()
    if history_positions.numel() != HISTORY_TOKENS:
        raise ValueError(f"expected {HISTORY_TOKENS} history placeholders, found {history_positions.numel()}")
    layout = PromptLayout(
        camera_indices=cams, n_frames=n_frames, n_image_tokens=n_image_tokens, slots=slots,
        label_ranges=label_ranges, view_ranges=view_ranges, tail=(slots[-1][-1][1], len(ids)),
        history_positions=history_positions, image_positions=image_positions, length=len(ids),
    )
    return ids_t, layout


# ---------------------------------------------------------------- reasoning text
def extract_reasoning(generated_ids, tokenizer, token_ids) -> str:
    """Chain-of-Causation text from generated ids (1-D sequence of ints or tensor).

    Takes the text after the last `<|cot_start|>` (or from the beginning: the prompt already ends
    with it) up to the first `<|cot_end|>` after that (or `<|traj_future_start|>`, or the end).
    Special and trajectory tokens inside are dropped; surrounding whitespace is stripped.
    """
    seq = [int(t) for t in (generated_ids.tolist() if torch.is_tensor(generated_ids) else generated_ids)]
    starts = [k for k, t in enumerate(seq) if t == token_ids.cot_start]
    begin = starts[-1] + 1 if starts else 0
    end = len(seq)
    for k in range(begin, len(seq)):
        if seq[k] in (token_ids.cot_end, token_ids.traj_future_start):
            end = k
            break
    # Text tokens only: the base vocabulary minus the Qwen specials.
    qwen_ids = set(token_ids.qwen.values())
    text_ids = [t for t in seq[begin:end] if t < token_ids.base_size and t not in qwen_ids]
    return _backend(tokenizer).decode(text_ids, skip_special_tokens=True).strip()
