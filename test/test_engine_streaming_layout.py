"""Streaming layout, slot shift and streaming mask on a synthetic layout (no model involved).

Layout: 2 prefix slots, 4 views x 4 frames, every frame = <vs> img <ve> (3 slots) preceded by a label
(2 slots before a view's first frame, 1 slot before the others), then a 3-slot tail.
"""

import pytest
import torch

from flashdrive_ros.engine.streaming import LayoutChanged, StreamingLayout, causal_mask

TEXT, VS, VE, IMG = 0, 1, 2, 3
N_VIEWS, N_FRAMES, PREFIX, TAIL = 4, 4, 2, 3


def synthetic_ids(frame_tokens: int = 1, tail: int = TAIL) -> list[int]:
    ids = [TEXT] * PREFIX
    for _v in range(N_VIEWS):
        for f in range(N_FRAMES):
            ids += [TEXT] * (2 if f == 0 else 1)
            ids += [VS] + [IMG] * frame_tokens + [VE]
    return ids + [TEXT] * tail


def classify(slot: int, layout: StreamingLayout):
    """(kind, view, frame, offset) of a slot, derived from the ranges — independent of the mask code."""
    if slot < layout.prefix_len:
        return ("prefix", None, None, slot)
    for v in range(layout.n_views):
        for f in range(layout.n_frames):
            lab, fr = layout.label_slots[v][f], layout.frame_slots[v][f]
            if lab[0] <= slot < lab[1]:
                return ("label", v, f, slot - lab[0])
            if fr[0] <= slot < fr[1]:
                return ("frame", v, f, slot - fr[0])
    if layout.tail[0] <= slot < layout.tail[1]:
        return ("tail", None, None, slot - layout.tail[0])
    return ("beyond", None, None, None)


def expected_visible(q_slot: int, k_slot: int, layout: StreamingLayout) -> bool:
    qk, qv, _qf, qo = classify(q_slot, layout)
    kk, kv, kf, ko = classify(k_slot, layout)
    last = layout.n_frames - 1
    if kk == "beyond":
        return False  # stale decode/action slots of earlier windows
    if kk == "prefix":
        return True  # every query sees the system prefix
    if qk == "tail":
        return kk in ("label", "frame") or ko <= qo  # all view slots, tail causally
    assert qk == "frame"
    if kk == "tail" or kv > qv:
        return False
    if kv < qv:
        return True  # all slots of earlier views
    if kf < last or kk == "label":
        return True  # F0-F2 of its own view (and the label in front of F3)
    return ko <= qo  # its own new frame causally


@pytest.fixture
def layout() -> StreamingLayout:
    return StreamingLayout.from_ids(synthetic_ids(), VS, VE, N_VIEWS, N_FRAMES, prefix_len=PREFIX)


def test_ranges_found_from_ids(layout):
    assert layout.prefix_len == PREFIX
    assert layout.frame_slots[0][0] == (4, 7)  # 2 prefix + 2 label slots
    assert layout.frame_slots[0][1] == (8, 11)
    assert layout.label_slots[1][0] == (19, 21)
    assert layout.frame_size == 3
    assert layout.prefill_len == len(synthetic_ids())
    assert layout.tail == (layout.prefill_len - TAIL, layout.prefill_len)


def test_query_slots_are_last_frame_of_each_view_then_tail(layout):
    q = layout.streaming_query_slots().tolist()
    expected = []
    for v in range(N_VIEWS):
        expected += list(range(*layout.frame_slots[v][3]))
    expected += list(range(*layout.tail))
    assert q == expected
    assert len(q) == N_VIEWS * 3 + TAIL


def test_streaming_mask_cell_by_cell(layout):
    max_len = layout.prefill_len + 10  # decode/action slots beyond the prompt
    mask = layout.streaming_mask(max_len)
    assert mask.shape == (1, 1, N_VIEWS * 3 + TAIL, max_len)
    assert mask.dtype == torch.float32
    neg = torch.finfo(torch.float32).min
    for row, q_slot in enumerate(layout.streaming_query_slots().tolist()):
        for k_slot in range(max_len):
            want = 0.0 if expected_visible(q_slot, k_slot, layout) else neg
            assert mask[0, 0, row, k_slot].item() == want, (row, q_slot, k_slot, classify(k_slot, layout))


def test_streaming_mask_spot_checks(layout):
    mask = layout.streaming_mask(layout.prefill_len + 4)[0, 0]
    q = layout.streaming_query_slots().tolist()
    v1_f3_first = q.index(layout.frame_slots[1][3][0])
    assert mask[v1_f3_first, layout.frame_slots[0][3][1] - 1] == 0  # sees view 0's new frame
    assert mask[v1_f3_first, layout.frame_slots[1][2][0]] == 0  # sees its own F2
    assert mask[v1_f3_first, layout.frame_slots[1][3][0] + 1] < 0  # not its own later F3 tokens
    assert mask[v1_f3_first, layout.frame_slots[2][0][0]] < 0  # not view 2
    assert mask[v1_f3_first, layout.tail[0]] < 0  # not the tail
    last_tail = len(q) - 1
    assert (mask[last_tail, : layout.prefill_len] == 0).all()
    assert (mask[last_tail, layout.prefill_len :] < 0).all()


def test_shift_moves_frames_one_slot_left_per_view(layout):
    src, dst = layout.shift_indices()
    assert src.dtype == dst.dtype == torch.long
    assert src.shape == dst.shape == (N_VIEWS * 3 * 3,)
    cache = torch.arange(layout.prefill_len + 5)
    before = cache.clone()
    cache[dst] = cache[src]  # one index copy, as the KV cache does it
    for v in range(N_VIEWS):
        for f in range(3):
            got = cache[slice(*layout.frame_slots[v][f])]
            assert got.tolist() == before[slice(*layout.frame_slots[v][f + 1])].tolist()
        # newest frame is left stale (overwritten by the next window's prefill); labels stay
        assert cache[slice(*layout.frame_slots[v][3])].tolist() == before[slice(*layout.frame_slots[v][3])].tolist()
        for f in range(4):
            lab = slice(*layout.label_slots[v][f])
            assert cache[lab].tolist() == before[lab].tolist()
    assert cache[: PREFIX].tolist() == before[: PREFIX].tolist()
    assert cache[layout.tail[0] :].tolist() == before[layout.tail[0] :].tolist()


def test_block_shift_needs_equal_labels(layout):
    with pytest.raises(ValueError, match="equal label lengths"):
        layout.shift_indices("block")  # frame 0 has a 2-slot label, frame 1 a 1-slot label
    with pytest.raises(ValueError, match="shift mode"):
        layout.shift_indices("ring")


def test_layout_change_is_detected(layout):
    same = StreamingLayout.from_ids(synthetic_ids(), VS, VE, N_VIEWS, N_FRAMES, prefix_len=PREFIX)
    layout.check_same_layout(same)
    bigger = StreamingLayout.from_ids(synthetic_ids(frame_tokens=2), VS, VE, N_VIEWS, N_FRAMES, prefix_len=PREFIX)
    with pytest.raises(LayoutChanged, match="layout changed"):
        layout.check_same_layout(bigger)
    longer_tail = StreamingLayout.from_ids(synthetic_ids(tail=5), VS, VE, N_VIEWS, N_FRAMES, prefix_len=PREFIX)
    with pytest.raises(LayoutChanged):
        layout.check_same_layout(longer_tail)
    with pytest.raises(LayoutChanged, match="expected 16 vision blocks"):
        StreamingLayout.from_ids(synthetic_ids()[:-10], VS, VE, N_VIEWS, N_FRAMES)


def test_unequal_frame_sizes_rejected(layout):
    frames = [list(v) for v in layout.frame_slots]
    frames[2][1] = (frames[2][1][0], frames[2][1][1] - 1)
    labels = [list(v) for v in layout.label_slots]
    with pytest.raises(ValueError, match="equal frame sizes"):
        StreamingLayout(tuple(map(tuple, frames)), tuple(map(tuple, labels)), layout.tail, layout.prefill_len)


def test_causal_mask_valid_length():
    m = causal_mask(torch.tensor([3, 5]), 8)[0, 0]
    assert (m[0, :4] == 0).all() and (m[0, 4:] < 0).all()
    assert (m[1, :6] == 0).all() and (m[1, 6:] < 0).all()


def test_layout_of_the_real_driving_prompt():
    """The 1.5 prompt built with the tiny tokenizer: PromptLayout ranges == vision id matching."""
    from flashdrive_ros.engine.loader import TINY_DIR
    from flashdrive_ros.engine.prompt import build_prompt
    from flashdrive_ros.engine.tokens import TokenIds, load_tokenizer

    tok = load_tokenizer(TINY_DIR, 1024)
    ids_table = TokenIds.from_tokenizer(tok, 1024)
    ids, playout = build_prompt(tok, ids_table, (0, 1, 2, 6), 4, n_image_tokens=5)
    lay = StreamingLayout.from_prompt_layout(playout)
    by_ids = StreamingLayout.from_ids(ids, ids_table.vision_start, ids_table.vision_end, 4, 4,
                                      prefix_len=playout.label_ranges[0][0])
    assert lay.frame_slots == by_ids.frame_slots and lay.tail == by_ids.tail
    assert lay.prefill_len == len(ids) and lay.frame_size == 7  # vs + 5 image tokens + ve
    for v in range(4):
        for f in range(4):
            s, e = lay.frame_slots[v][f]
            assert ids[s] == ids_table.vision_start and ids[e - 1] == ids_table.vision_end
            lab = ids[slice(*lay.label_slots[v][f])]
            assert len(lab) > 0 and not (lab == ids_table.image_pad).any()  # "frame k " text
    # The tail holds the 48 history placeholders and ends with <|cot_start|>.
    tail = ids[slice(*lay.tail)]
    assert int((tail == ids_table.traj_history).sum()) == 48 and tail[-1] == ids_table.cot_start
