"""Camera synchronisation (pure): anchor t0 on a 0.1 s stride, last frame at or before t0 - k*0.1 s within
tolerance, missing-camera policies, out-of-order rejection, backwards jumps and gaps."""

import pytest

from flashdrive_ros.nodes.camera_sync import AddStatus, CameraSync

MS = 1000
FRAME_30FPS = 33_333


def feed(sync, t_us, cams=range(4), offsets=None):
    """Add one frame per camera at t_us (+ per-camera offset); payload = (cam, stamp). Returns windows."""
    wins = []
    for c in cams:
        t = t_us + (offsets or {}).get(c, 0)
        sync.add(c, t, (c, t))
        w = sync.pop_window()
        if w is not None:
            wins.append(w)
    return wins


def run_clip(sync, t_end_us, step=FRAME_30FPS, **kw):
    wins = []
    t = 0
    while t <= t_end_us:
        wins += feed(sync, t, **kw)
        t += step
    return wins


def test_windows_follow_a_100ms_stride_with_the_dataset_frame_rule_at_30fps():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS)
    wins = run_clip(sync, 1_000_000)
    t0s = [w.t0_us for w in wins]
    # the first window needs 0.3 s of history; after that one window per ~0.1 s of anchor time
    assert t0s[0] == 10 * FRAME_30FPS  # first anchor stamp with a frame at or before t0 - 0.3 s
    assert all(95 * MS <= b - a <= 105 * MS for a, b in zip(t0s, t0s[1:]))
    for w in wins:
        assert w.ok and not w.filled
        for c in range(4):
            for k, stamp in enumerate(w.stamps_us[c]):
                target = w.t0_us - (3 - k) * 100 * MS
                # last frame at or before the target, i.e. within one 30 fps frame before it
                assert target - FRAME_30FPS < stamp <= target
                assert w.frames[c][k] == (c, stamp)


def test_window_waits_for_every_camera_to_reach_t0():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS)
    for t in range(0, 400_000, 100_000):
        feed(sync, t, cams=[0, 2, 3])
        sync.add(1, t, (1, t))
    # anchor 0.4 arrives first: cameras 0, 2, 3 are still at 0.3 -> not decidable yet
    sync.add(1, 400_000, (1, 400_000))
    assert sync.pop_window().t0_us == 300_000  # the older, complete window is emitted instead
    feed(sync, 400_000, cams=[0, 2])
    assert sync.pop_window() is None
    sync.add(3, 400_000, (3, 400_000))
    w = sync.pop_window()
    assert w.t0_us == 400_000 and w.ok
    assert [s[-1] for s in w.stamps_us] == [400_000] * 4


def test_frame_older_than_tolerance_is_not_used():
    sync = CameraSync(anchor=1, tolerance_us=20 * MS)
    # camera 3 lags by 30 ms: its last frame at or before each target is 70 ms old -> out of tolerance
    wins = run_clip(sync, 600_000, step=100_000, offsets={3: 30 * MS})
    assert wins and all(w.missing == [3] and not w.ok for w in wins)


def test_silent_camera_skip_policy_reports_it_missing_after_tolerance():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS, missing_policy="skip")
    wins = run_clip(sync, 800_000, step=100_000, cams=[0, 1, 2])
    assert wins, "a silent camera must not stall the pipeline forever"
    assert all(w.missing == [3] for w in wins)


def test_repeat_last_and_black_policies_fill_the_silent_camera():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS, missing_policy="repeat_last")
    run_clip(sync, 500_000, step=100_000)
    wins = []
    for t in range(600_000, 1_000_000, 100_000):
        wins += feed(sync, t, cams=[0, 1, 2])
    assert wins and all(w.ok and w.filled == {3: "repeat_last"} for w in wins)
    assert all(w.frames[3] == [(3, 500_000)] * 4 for w in wins)

    sync = CameraSync(anchor=1, tolerance_us=50 * MS, missing_policy="black")
    wins = run_clip(sync, 800_000, step=100_000, cams=[0, 1, 2])
    assert wins and all(w.ok and w.filled == {3: "black"} and w.frames[3] == [None] * 4 for w in wins)


def test_out_of_order_frame_is_rejected_and_not_used():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS)
    run_clip(sync, 500_000, step=100_000)
    assert sync.add(0, 450_000, "late") is AddStatus.OUT_OF_ORDER
    assert sync.add(0, 500_000, "duplicate") is AddStatus.OUT_OF_ORDER
    assert sync.rejected[0] == 2
    w = feed(sync, 600_000)[-1]
    assert "late" not in w.frames[0] and "duplicate" not in w.frames[0]


def test_backwards_jump_clears_buffers_and_restarts_windows():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS, time_jump_us=1_000_000)
    run_clip(sync, 3_000_000, step=100_000)
    assert sync.add(0, 0, (0, 0)) is AddStatus.TIME_JUMP  # loop: clip time back to 0
    # nothing from the old timeline may appear in a new window
    wins = []
    for c in (1, 2, 3):
        assert sync.add(c, 0, (c, 0)) is AddStatus.ACCEPTED
    for t in range(100_000, 400_000, 100_000):
        wins += feed(sync, t)
    assert [w.t0_us for w in wins] == [300_000]
    assert all(s <= 300_000 for cam in wins[0].stamps_us for s in cam)


def test_forward_gap_is_flagged_on_the_stamp_and_the_window():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS, gap_us=150 * MS)
    run_clip(sync, 500_000, step=100_000)
    assert sync.add(0, 2_000_000, (0, 2_000_000)) is AddStatus.GAP
    for c in (1, 2, 3):
        sync.add(c, 2_000_000, (c, 2_000_000))
    for t in range(2_100_000, 2_400_000, 100_000):
        wins = feed(sync, t)
    w = wins[-1]
    assert w.t0_us == 2_300_000 and w.gap and w.ok


def test_superseded_windows_are_counted_when_a_newer_one_is_ready():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS)
    assert [w.t0_us for w in run_clip(sync, 300_000, step=100_000)] == [300_000]
    t = 400_000
    while t <= 1_000_000:  # feed without polling: several complete windows pile up
        for c in range(4):
            sync.add(c, t, (c, t))
        t += 100_000
    w = sync.pop_window()
    assert w.t0_us == 1_000_000
    assert w.superseded == 6  # 0.4 .. 0.9 s were complete but older
    assert sync.pop_window() is None


def test_invalid_configuration_is_refused():
    with pytest.raises(ValueError):
        CameraSync(anchor=4)
    with pytest.raises(ValueError):
        CameraSync(missing_policy="zeros")


def test_camera_returning_after_silence_is_usable_in_the_first_window_by_repeating_its_frame():
    sync = CameraSync(anchor=1, tolerance_us=50 * MS)
    run_clip(sync, 500_000, step=100_000)
    for t in range(600_000, 1_000_000, 100_000):
        feed(sync, t, cams=[0, 1, 2])          # camera 3 silent
    *before, w = feed(sync, 1_000_000)         # camera 3 back
    assert [b.missing for b in before] == [[3]]  # 0.9 s is decided (camera 3 missing) once 1.0 s arrives
    assert w.ok and w.t0_us == 1_000_000
    assert w.padded == {3: 3}
    assert w.frames[3] == [(3, 1_000_000)] * 4  # older slots repeat the next newer frame
    assert w.stamps_us[0] == [700_000, 800_000, 900_000, 1_000_000]
