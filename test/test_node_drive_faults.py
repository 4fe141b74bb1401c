"""Drive node under bad input (in-process: drive node + probe node in a private rclpy context and domain).

For every case: the node stays up, /diagnostics names the problem, nothing is published for the affected
window (no garbage), and the first window whose own inputs are good again is published. One rig serves
all compressed-image cases, each on its own stretch of timeline (rig.segment()); the engine is the
kinematic double because these tests are about the node.
"""
import math

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus

import test_node_harness as h
from flashdrive_ros.nodes.params import DEFAULTS

pytestmark = [pytest.mark.ros, pytest.mark.skipif(h.ROS_REASON is not None, reason=str(h.ROS_REASON))]
OUTPUTS = ("trajectory", "path", "markers", "reasoning", "latency")


@pytest.fixture(scope="module")
def rig():
    r = h.Rig(engine_factory=h.KinematicEngine.from_pretrained)
    yield r
    r.close()


def published(rig, t_us):
    present = [t_us in rig.out.stamps(name) for name in OUTPUTS]
    assert all(present) or not any(present), f"partial output set for t0={t_us}: {present}"
    return all(present)


def assert_diag(rig, *words):
    texts = rig.out.diag_texts()
    assert any(all(w in t for w in words) for t in texts), f"no diagnostics with {words}; last: {texts[-2:]}"


def finite_trajectories(rig):
    for traj in rig.out.trajectory:
        xyz = np.array([[p.position.x, p.position.y, p.position.z] for s in traj.samples for p in s.poses])
        assert xyz.shape == (64, 3) and np.all(np.isfinite(xyz))
    return True


def test_clean_stream_publishes_every_output_stamped_with_t0(rig):
    t = rig.segment()
    rig.run(t, t + 300_000)
    t0s = [s for s in rig.out.stamps("trajectory")]
    assert t0s == list(range(300_000, t + 400_000, 100_000))
    for name in OUTPUTS:
        assert rig.out.stamps(name) == t0s, name
    assert finite_trajectories(rig)
    assert rig.node.stats["dropped"] == 0 and rig.node.stats["rejected"] == 0
    rig.advance(t + 400_000)


def test_corrupt_jpeg(rig):
    t = rig.segment()
    data = h.jpeg(h.camera_image(2, t / 1e6))
    rig.tick(t, replace={2: rig.image_msg(2, t, data=data[: len(data) // 3])})
    rig.wait_window(t)
    rig.run(t + 100_000, t + 100_000, )
    rig.wait_window(t + 100_000)
    assert not published(rig, t)
    assert_diag(rig, "camera_cross_right_120fov", "corrupt jpeg")
    assert published(rig, t + 100_000)  # the bad frame, now an older slot, repeats the newer one
    assert rig.node.stats["bad_frames_repeated"] >= 1
    rig.advance(t + 200_000)


def test_wrong_image_size(rig):
    t = rig.segment()
    rig.tick(t, replace={0: rig.image_msg(0, t, img=h.camera_image(0, 0, h=40, w=64))})
    rig.wait_window(t)
    rig.tick(t + 100_000)
    rig.wait_window(t + 100_000)
    assert not published(rig, t)
    assert_diag(rig, "camera_cross_left_120fov", "wrong image size 64x40, expected 128x72")
    assert published(rig, t + 100_000)
    rig.advance(t + 200_000)


def test_one_camera_silent(rig):
    t = rig.segment()
    for k in range(4):                       # front tele silent for 0.4 s
        rig.tick(t + k * 100_000, skip_cams=(3,))
        if k:
            rig.wait_window(t + (k - 1) * 100_000)  # decided once the others are past t0 + tolerance
    back = t + 400_000
    rig.tick(back)
    rig.wait_window(back)
    assert not any(published(rig, t + k * 100_000) for k in range(4))
    assert_diag(rig, "no frame within 50 ms for camera_front_tele_30fov")
    assert published(rig, back)
    assert finite_trajectories(rig)
    rig.advance(back + 100_000)


def test_nan_odometry_is_rejected_and_the_window_still_uses_the_good_poses(rig):
    t = rig.segment()
    rig.odom(t - 90_000, xyz=(math.nan, 0.0, 0.0))
    rig.odom(t - 85_000, quat=(0.0, 0.0, 0.0, 0.0))
    rig.tick(t)
    rig.wait_window(t)
    assert_diag(rig, "odometry rejected", "non-finite odometry pose")
    assert_diag(rig, "invalid odometry quaternion")
    assert published(rig, t) and finite_trajectories(rig)
    rig.advance(t + 100_000)


def test_stale_odometry(rig):
    t = rig.segment()
    rig.tick(t, odom=False)                  # newest pose 0.1 s old: still within 100 ms
    rig.wait_window(t)
    rig.tick(t + 100_000, odom=False)        # 0.2 s old: stale
    rig.wait_window(t + 100_000)
    rig.tick(t + 200_000)                    # odometry back; the 0.2 s hole is bridged
    rig.wait_window(t + 200_000)
    assert published(rig, t)
    assert not published(rig, t + 100_000)
    assert_diag(rig, "odometry stale")
    assert published(rig, t + 200_000)
    rig.advance(t + 300_000)


def test_out_of_order_stamps(rig):
    t = rig.segment()
    rig.tick(t)
    rig.wait_window(t)
    before = len(rig.out.trajectory)
    rig.cam_pubs[0].publish(rig.image_msg(0, t - 250_000))   # late frame of a side camera
    rig.cam_pubs[1].publish(rig.image_msg(1, t - 50_000))    # late anchor frame: must not become a t0
    rig.odom(t - 30_000)                                      # late odometry
    rig.tick(t + 100_000)
    rig.wait_window(t + 100_000)
    assert_diag(rig, "camera_cross_left_120fov: out-of-order stamp")
    assert_diag(rig, "out-of-order odometry stamp")
    assert published(rig, t + 100_000)
    assert rig.out.stamps("trajectory")[before:] == [t + 100_000]  # nothing for t - 50 ms
    rig.advance(t + 200_000)


def test_clock_reset_resets_the_engine_and_restarts_cleanly(rig):
    t = rig.segment()
    resets = rig.node.stats["resets"]
    n_before = len(rig.out.trajectory)
    back = t - 20_000_000                     # every source jumps 20 s back
    rig.preroll(back)
    rig.run(back, back + 500_000)
    new = rig.out.stamps("trajectory")[n_before:]
    assert new == [back + 300_000, back + 400_000, back + 500_000]  # recovers on the first full window
    lat = [m for m in rig.out.latency if h.stamp_us(m.header.stamp) - h.EPOCH_US == back + 300_000][0]
    assert lat.full_prefill
    assert rig.node.stats["resets"] == resets + 1
    assert "time_jump" in rig.node.last_reset_reason
    rig.advance(t + 100_000)


def test_wrong_encoding_on_raw_transport():
    topics = [t.replace("/compressed", "") for t in DEFAULTS["camera_topics"]]
    rig = h.Rig(engine_factory=h.KinematicEngine.from_pretrained, image_transport="raw", camera_topics=topics)
    try:
        t = rig.segment()
        img = h.camera_image(2, t / 1e6)
        rig.tick(t, replace={2: rig.image_msg(2, t, img=img, encoding="16UC1")})
        rig.wait_window(t)
        rig.tick(t + 100_000)
        rig.wait_window(t + 100_000)
        assert not published(rig, t)
        assert_diag(rig, "camera_cross_right_120fov", "unsupported image encoding '16UC1'")
        assert published(rig, t + 100_000)
    finally:
        rig.close()


def test_engine_exception_and_nan_output(monkeypatch):
    """The engine comes from the `engine_factory` parameter (how a deployment would swap it)."""
    monkeypatch.setitem(h.FAULTS, 600_000, "raise")
    monkeypatch.setitem(h.FAULTS, 900_000, "nan")
    rig = h.Rig(engine_factory=None, engine_factory_param="test_node_harness:faulty_engine_factory")
    try:
        rig.preroll()
        rig.run(0, 1_100_000)
        stamps = rig.out.stamps("trajectory")
        assert 600_000 not in stamps and 900_000 not in stamps
        assert not published(rig, 600_000) and not published(rig, 900_000)
        assert stamps == [300_000, 400_000, 500_000, 700_000, 800_000, 1_000_000, 1_100_000]
        assert_diag(rig, "engine failed on t0", "RuntimeError: injected engine failure")
        assert_diag(rig, "non-finite trajectory")
        levels = [arr.status[0].level for arr in rig.out.diagnostics]
        assert DiagnosticStatus.ERROR in levels                  # ERROR while it happened ...
        assert rig.out.diagnostics[-1].status[0].level == DiagnosticStatus.OK  # ... OK once recovered
        full = {h.stamp_us(m.header.stamp) - h.EPOCH_US: m.full_prefill for m in rig.out.latency}
        assert full[700_000] and full[1_000_000]   # engine state is reset after a failure
        assert not full[800_000]
        assert finite_trajectories(rig)
        assert rig.node.engine.resets >= 3
    finally:
        rig.close()


def first_latency(rig, t_us):
    return [m for m in rig.out.latency if h.stamp_us(m.header.stamp) - h.EPOCH_US == t_us][0]


def test_gap_in_input_time_resets_the_engine(rig):
    rig.segment()
    t = rig.segment(gap_s=2.0)               # inputs resume 2 s later on the same clock
    assert "gap" in rig.node.last_reset_reason
    assert first_latency(rig, t - 300_000).full_prefill
    assert not first_latency(rig, t - 200_000).full_prefill   # streaming again on the next window
    rig.advance(t)


def test_clip_boundary_resets_and_drops_the_old_clip_buffers(rig):
    t = rig.segment()
    resets = rig.node.stats["resets"]
    rig.boundary(t)
    rig._wait(lambda: any("clip_boundary" in r for r in rig.node._reset_reasons), 5, "boundary received")
    rig.preroll(t)                            # the new clip's odometry (the old one was dropped)
    rig.run(t, t + 300_000)
    assert rig.node.stats["resets"] == resets + 1
    assert "clip_boundary:next_bag" in rig.node.last_reset_reason
    assert first_latency(rig, t + 300_000).full_prefill
    # frames from before the boundary are not mixed into the new clip: the first window is 0.3 s after it
    assert not published(rig, t + 100_000) and not published(rig, t + 200_000)
    rig.advance(t + 400_000)


def test_busy_worker_keeps_the_newest_window_and_counts_drops():
    """While the worker is busy the newest window replaces the waiting one (a counted drop); the worker
    then runs the newest window. The engine double blocks each step until the test releases it, so the
    test decides which windows arrive while the worker is busy (no dependence on machine speed).

    Skipped windows: since reset_gap_ms defaults to 350 ms (was 150) the node no longer resets after a gap
    of 2-3 windows; it leaves those to the engine, which continues its stream across them
    (test_engine_streaming_gaps.py). This double streams unless the node resets it, so: the first window
    and any window after a gap > reset_gap_ms are full prefills, windows after a gap <= reset_gap_ms
    (skipped windows or none) are not."""
    rig = h.Rig(engine_factory=h.GatedEngine.from_pretrained)
    try:
        engine = rig.node.engine
        assert isinstance(engine, h.GatedEngine), rig.node.last_error
        assert rig.node.params.reset_gap_ms * 1000 == 350_000
        rig.preroll()
        for t in (0, 100_000, 200_000):               # no window yet: the anchor does not cover t - 0.3 s
            rig.tick(t)
        rig.tick(300_000)                             # first window, idle worker: taken at once
        assert engine.wait_step() == 300_000
        assert rig.node.stats["dropped"] == 0
        # windows published while the worker is blocked on the previous one; the last of each burst is
        # the one the worker must run next (gap to the previous processed window in the comment)
        bursts = [(400_000, 500_000, 600_000),                       # 300 ms: 2 dropped, streams on
                  (700_000,),                                         # 100 ms: nothing dropped
                  (800_000, 900_000, 1_000_000, 1_100_000),           # 400 ms: 3 dropped, reset
                  tuple(range(1_200_000, 2_000_001, 100_000))]        # 900 ms: 8 dropped, reset
        processed, dropped = [300_000], 0
        bounds = []                                   # per processed window: drops counted (taken, released)
        for burst in bursts:
            taken = dropped
            for k, t in enumerate(burst):
                rig.tick(t)
                rig.wait_ready(t)                     # the node holds window t for the busy worker
                dropped += k > 0                      # ... and it replaced the one waiting before it
                assert rig.node.stats["dropped"] == dropped, (t, rig.node.stats)
            bounds.append((taken, dropped))
            engine.release()                          # finish processed[-1]; the worker takes the newest
            assert engine.wait_step() == burst[-1]
            processed.append(burst[-1])
        bounds.append((dropped, dropped))
        engine.release()
        rig.wait_window(2_000_000, timeout=30)
        rig._wait(lambda: all(len(getattr(rig.out, n)) >= len(processed) for n in OUTPUTS), 10, "all outputs")

        assert processed == [300_000, 600_000, 700_000, 1_100_000, 2_000_000]
        for name in OUTPUTS:
            assert rig.out.stamps(name) == processed, name
        stats = rig.node.stats
        assert dropped == 13 == 18 - len(processed)   # every one of the 18 windows is processed or counted
        assert (stats["dropped"], stats["superseded"], stats["windows"], stats["published"]) == (13, 0, 5, 5)
        assert (stats["rejected"], stats["engine_errors"]) == (0, 0)
        lat = rig.out.latency
        counts = [m.dropped_frames for m in lat]
        assert counts == sorted(counts) and counts[-1] == stats["dropped"], counts
        for m, (lo, hi) in zip(lat, bounds):          # the drop count when the window was published
            assert lo <= m.dropped_frames <= hi, (counts, bounds)
        reset_gap_us = rig.node.params.reset_gap_ms * 1000
        gaps = [b - a for a, b in zip(processed, processed[1:])]
        assert gaps == [300_000, 100_000, 400_000, 900_000]
        full = [True] + [gap > reset_gap_us for gap in gaps]      # first window, then gaps > reset_gap_ms
        assert full == [True, False, False, True, True]
        assert [m.full_prefill for m in lat] == full
        assert stats["resets"] == sum(full) == 3 and rig.node.last_reset_reason == "gap"   # start, gap, gap
        assert engine.steps == 5
    finally:
        if isinstance(rig.node.engine, h.GatedEngine):
            rig.node.engine.open()                    # never leave the worker blocked (shutdown joins it)
        rig.close()


def test_windows_older_than_max_frame_age_are_skipped():
    # the rig's stamps are in 2023 while the node clock is wall time: every window is far too old
    rig = h.Rig(engine_factory=h.KinematicEngine.from_pretrained, max_frame_age_ms=500.0)
    try:
        rig.preroll()
        for t in range(0, 500_001, 100_000):
            rig.tick(t)
        rig.wait_window(500_000)
        assert rig.node.stats["stale"] >= 1 and rig.out.trajectory == []
        assert_diag(rig, "stale: t0 is", "max_frame_age_ms 500")
    finally:
        rig.close()
