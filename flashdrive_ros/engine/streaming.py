"""Streaming layout: which cache slots a window re-computes, how frames shift, and what they may see.

Consecutive 10 Hz windows share 3 of their 4 frames per camera; windows k = 1, 2, 3 strides apart
(inference slower than 0.1 s drops windows) share 4 - k. The prompt template is fixed, so window 0's
token layout is frozen:

    [system prefix][V0: label F0 F1 F2 F3][V1 ...][V2 ...][V3 ...][tail: history + instruction + cot_start]

Each frame block is `<|vision_start|> image tokens <|vision_end|>` and occupies a fixed range of cache
slots; every slot has a fixed M-RoPE position. Per later window k strides after the previous one, the
K/V of frames k..3 are first copied into the slots of frames 0..3-k (the *shift*, `shift_indices(k=k)`),
then only the newest k frames of each view and the tail are recomputed (the *query*,
`streaming_query_slots(k)`), written at their own slots. Keys are stored pre-RoPE, so a copied frame is
rotated at its new slot's position when it is read.

The streaming mask is the original causal mask restricted to the recomputed rows: a query row at slot s
sees exactly the keys at slots <= s that belong to the prompt (< prefill_len). Spelled out:
  * every row sees the system prefix;
  * view-i new-frame rows see all slots of views < i, the reused frames F0..F(3-k) of view i (and the
    labels in front of every frame of view i up to their own), and the new frames F(4-k)..F3 of view i
    causally (an earlier new frame completely, their own frame up to themselves);
  * tail rows see every view slot and the tail causally;
  * no row sees a key at or after prefill_len (decode / action slots of the previous window are stale).
For k = 1 this is: F0-F2 of view i and F3 causally.

A layout is only valid for prompts with exactly the same slot ranges; `check_same_layout` raises
`LayoutChanged` otherwise and the engine then resets the stream (full prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHIFT_MODES = ("vision_only", "block")


class LayoutChanged(ValueError):
    """The prompt of this window does not have the frozen slot layout; the stream must be reset."""


Range = tuple[int, int]  # half-open [start, end) slot range


def _check_range(name: str, r: Range, limit: int) -> None:
    start, end = int(r[0]), int(r[1])
    if not (0 <= start < end <= limit):
        raise ValueError(f"{name} = {r} is not a non-empty range inside [0, {limit})")


@dataclass(frozen=True)
class StreamingLayout:
    """Frozen slot ranges of window 0.

    frame_slots[v][f]: [start, end) of frame f of view v, from `<|vision_start|>` to `<|vision_end|>`
    inclusive. label_slots[v][f]: [start, end) of the text label in front of that frame (may be an
    empty range (s, s) when there is none). tail: [start, prefill_len).
    """

    frame_slots: tuple[tuple[Range, ...], ...]
    label_slots: tuple[tuple[Range, ...], ...]
    tail: Range
    prefill_len: int

    def __post_init__(self) -> None:
        n_views = len(self.frame_slots)
        if n_views == 0:
            raise ValueError("StreamingLayout needs at least one view")
        n_frames = len(self.frame_slots[0])
        if n_frames < 2:
            raise ValueError(f"StreamingLayout needs >= 2 frames per view to stream, got {n_frames}")
        if len(self.label_slots) != n_views:
            raise ValueError(f"label_slots has {len(self.label_slots)} views, frame_slots has {n_views}")
        size = self.frame_slots[0][0][1] - self.frame_slots[0][0][0]
        prev_end = 0
        for v in range(n_views):
            if len(self.frame_slots[v]) != n_frames or len(self.label_slots[v]) != n_frames:
                raise ValueError(f"view {v} does not have {n_frames} frames (and labels)")
            for f in range(n_frames):
                lab, fr = self.label_slots[v][f], self.frame_slots[v][f]
                _check_range(f"frame_slots[{v}][{f}]", fr, self.prefill_len)
                if not (prev_end <= lab[0] <= lab[1] == fr[0]):
                    raise ValueError(
                        f"label_slots[{v}][{f}] = {lab} must end where frame_slots[{v}][{f}] = {fr} starts "
                        f"and start after the previous block (ends at {prev_end})"
                    )
                # The shift copies frame f+1 onto frame f: every frame block must be equally long.
                if fr[1] - fr[0] != size:
                    raise ValueError(
                        f"frame_slots[{v}][{f}] has {fr[1] - fr[0]} slots, frame 0 of view 0 has {size}; "
                        "streaming needs equal frame sizes"
                    )
                prev_end = fr[1]
        _check_range("tail", self.tail, self.prefill_len + 1)
        if self.tail[0] != prev_end or self.tail[1] != self.prefill_len:
            raise ValueError(
                f"tail = {self.tail} must be [end of the last frame = {prev_end}, prefill_len = {self.prefill_len})"
            )

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_ids(
        cls,
        ids: torch.Tensor | list[int],
        vision_start_id: int,
        vision_end_id: int,
        n_views: int,
        n_frames: int = 4,
        prefix_len: int | None = None,
    ) -> "StreamingLayout":
        """Find the frame blocks by matching vision start/end ids (frame k belongs to view k // n_frames).

        Labels are the text between two consecutive blocks of a view; the label of a view's first frame
        is the text after the previous view (or after `prefix_len` for view 0, default: no label).
        """
        ids_t = torch.as_tensor(ids).flatten()
        starts = (ids_t == vision_start_id).nonzero().flatten().tolist()
        ends = (ids_t == vision_end_id).nonzero().flatten().tolist()
        expected = n_views * n_frames
        if len(starts) != expected or len(ends) != expected:
            raise LayoutChanged(
                f"expected {expected} vision blocks ({n_views} views x {n_frames} frames), found "
                f"{len(starts)} <|vision_start|> and {len(ends)} <|vision_end|>"
            )
        frames, labels = [], []
        prev_end = starts[0] if prefix_len is None else int(prefix_len)
        for v in range(n_views):
            fr_v, lab_v = [], []
            for f in range(n_frames):
                s, e = starts[v * n_frames + f], ends[v * n_frames + f] + 1
                if e <= s:
                    raise LayoutChanged(f"vision block {v * n_frames + f} ends before it starts")
                fr_v.append((s, e))
                lab_v.append((prev_end, s))
                prev_end = e
            frames.append(tuple(fr_v))
            labels.append(tuple(lab_v))
        n = int(ids_t.numel())
        return cls(tuple(frames), tuple(labels), (prev_end, n), n)

    @classmethod
    def from_prompt_layout(cls, layout) -> "StreamingLayout":
        """From prompt.PromptLayout: frame blocks = `slots`, label of frame f = the text between the
        previous block (or the view's label start) and the frame's `<|vision_start|>`."""
        labels = []
        for v, view in enumerate(layout.slots):
            lab_v, prev_end = [], layout.label_ranges[v][0]
            for start, end in view:
                lab_v.append((prev_end, start))
                prev_end = end
            labels.append(tuple(lab_v))
        return cls(tuple(tuple(view) for view in layout.slots), tuple(labels), tuple(layout.tail), layout.length)

    # ----------------------------------------------------------------- derived quantities
    @property
    def n_views(self) -> int:
        return len(self.frame_slots)

    @property
    def n_frames(self) -> int:
        return len(self.frame_slots[0])

    @property
    def frame_size(self) -> int:
        fr = self.frame_slots[0][0]
        return fr[1] - fr[0]

    @property
    def prefix_len(self) -> int:
        """Slots before the first view's first label: the system prefix, seen by every query."""
        return self.label_slots[0][0][0]

    def check_same_layout(self, other: "StreamingLayout") -> None:
        """Raise LayoutChanged unless `other` (this window's prompt) has exactly the frozen ranges."""
        if other != self:
            raise LayoutChanged(
                "prompt layout changed since the stream started (prefill_len "
                f"{self.prefill_len} -> {other.prefill_len}, frame size {self.frame_size} -> "
                f"{other.frame_size}, tail {self.tail} -> {other.tail}); reset the stream"
            )

    # ----------------------------------------------------------------- slot index tensors
    def _check_k(self, k: int) -> int:
        k = int(k)
        if not 1 <= k <= self.n_frames - 1:
            raise ValueError(f"k (new frames per view) must be in [1, {self.n_frames - 1}], got {k}")
        return k

    def shift_indices(self, mode: str = "vision_only", k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(src_slots, dst_slots) for one index copy moving frames k..F-1 onto frames 0..F-1-k of every view.

        vision_only: the `<|vision_start|> .. <|vision_end|>` blocks only (labels stay in place).
        block: label + frame block together; requires equal label lengths for the moved pairs of a view.
        Sources and destinations overlap for k < F/2; the cache reads all sources before writing.
        """
        if mode not in SHIFT_MODES:
            raise ValueError(f"shift mode must be one of {SHIFT_MODES}, got {mode!r}")
        k = self._check_k(k)
        src, dst = [], []
        for v in range(self.n_views):
            for f in range(self.n_frames - k):
                s_rng, d_rng = self.frame_slots[v][f + k], self.frame_slots[v][f]
                if mode == "block":
                    s_lab, d_lab = self.label_slots[v][f + k], self.label_slots[v][f]
                    if s_lab[1] - s_lab[0] != d_lab[1] - d_lab[0]:
                        raise ValueError(
                            f"block shift needs equal label lengths, view {v}: frame {f + k} label has "
                            f"{s_lab[1] - s_lab[0]} slots, frame {f} has {d_lab[1] - d_lab[0]}"
                        )
                    s_rng, d_rng = (s_lab[0], s_rng[1]), (d_lab[0], d_rng[1])
                src.append(torch.arange(*s_rng))
                dst.append(torch.arange(*d_rng))
        return torch.cat(src), torch.cat(dst)

    def new_frame_slots(self, k: int = 1) -> torch.Tensor:
        """Slots of the newest k frames of each view, view-major and oldest first within a view (where
        the 4*k new images are written, in the order frames[:, -k:] flattens to)."""
        k = self._check_k(k)
        return torch.cat([torch.arange(*self.frame_slots[v][f])
                          for v in range(self.n_views) for f in range(self.n_frames - k, self.n_frames)])

    def streaming_query_slots(self, k: int = 1) -> torch.Tensor:
        """Query slots of a streaming window with k new frames per view: the last k frame blocks of each
        view (oldest first) ++ the tail range."""
        return torch.cat([self.new_frame_slots(k), torch.arange(*self.tail)])

    def streaming_mask(self, max_len: int, dtype: torch.dtype = torch.float32, k: int = 1) -> torch.Tensor:
        """Additive mask [1, 1, Q, max_len] for `streaming_query_slots(k)`: 0 where a query row may
        attend, dtype-min elsewhere.

        Query row q sits at slot s_q and sees keys k with k <= s_q and k < prefill_len (see module doc).
        """
        if max_len < self.prefill_len:
            raise ValueError(f"max_len {max_len} is smaller than prefill_len {self.prefill_len}")
        q_slots = self.streaming_query_slots(k)
        keys = torch.arange(max_len)
        visible = (keys[None, :] <= q_slots[:, None]) & (keys[None, :] < self.prefill_len)
        mask = torch.zeros(visible.shape, dtype=dtype)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None, None]


def causal_mask(q_slots: torch.Tensor, n_keys: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive [1, 1, Q, n_keys] mask: row q sees keys at slots <= q_slots[q] (valid-length masking).

    Used for the full prefill and for every decode step, so a decode token never sees stale slots past
    itself (old decode/action K/V of a previous window, or garbage in unused slots).
    """
    q_slots = torch.as_tensor(q_slots).flatten()
    keys = torch.arange(n_keys, device=q_slots.device)
    visible = keys[None, :] <= q_slots[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=q_slots.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]
