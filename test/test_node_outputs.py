"""StepResult -> ROS messages: every message stamped with t0 in base_link, 64 poses per sample with
(k+1)*0.1 s timing, orientations from the predicted rotations, stage latencies that sum to the total,
and a gate that refuses non-finite or mis-shaped results."""
import math

import numpy as np
import pytest

import test_node_harness as h

pytestmark = pytest.mark.skipif(h.ROS_REASON is not None, reason=str(h.ROS_REASON))
T0 = h.EPOCH_US + 5_100_000


@pytest.fixture(scope="module")
def outputs():
    h.ros_env.load_messages()
    from flashdrive_ros.nodes import outputs
    return outputs


def result(k=2, yaw_rate=0.05, **over):
    xyz = np.zeros((k, 64, 3), np.float32)
    yaw = np.zeros((k, 64), np.float32)
    for s in range(k):
        yaw[s] = yaw_rate * (s + 1) * np.arange(1, 65)
        xyz[s, :, 0] = np.arange(1, 65) * (1.0 + s)
    c, sn = np.cos(yaw), np.sin(yaw)
    rot = np.zeros((k, 64, 3, 3), np.float32)
    rot[..., 0, 0], rot[..., 0, 1], rot[..., 1, 0], rot[..., 1, 1], rot[..., 2, 2] = c, -sn, sn, c, 1
    r = h.FakeResult(xyz=xyz, yaw=yaw, rot=rot, reasoning="Slow down for the pedestrian.", num_tokens=9,
                     timings_ms={"preprocess": 1.0, "encode": 2.0, "prefill": 3.0, "decode": 4.0, "action": 5.0,
                                 "total": 16.5},
                     full_prefill=True, verify_passes=5, tokens_per_pass=1.8, t0_us=T0)
    for key, v in over.items():
        setattr(r, key, v)
    return r


def test_trajectory_is_stamped_t0_with_k_samples_of_64_poses(outputs):
    r = result()
    m = outputs.to_trajectory(r, "base_link")
    assert h.stamp_us(m.header.stamp) == T0 and m.header.frame_id == "base_link"
    assert len(m.samples) == 2 and all(len(s.poses) == 64 for s in m.samples)
    assert math.isclose(m.time_step, 0.1, rel_tol=1e-6)
    assert [d.sec * 1e9 + d.nanosec for d in m.time_from_start[:3]] == [1e8, 2e8, 3e8]
    assert m.time_from_start[63].sec == 6 and m.time_from_start[63].nanosec == 400_000_000
    p = m.samples[1].poses[9]
    assert (p.position.x, p.position.y) == (20.0, 0.0)
    q = p.orientation   # yaw = 0.1 * 10 = 1.0 rad about z
    assert math.isclose(2 * math.atan2(q.z, q.w), 1.0, abs_tol=1e-5) and abs(q.x) < 1e-7 and abs(q.y) < 1e-7


def test_rot_to_quat_matches_matrices_for_arbitrary_rotations(outputs):
    from flashdrive_ros.nodes.ego_history import quat_to_matrix
    rng = np.random.default_rng(0)
    for q in rng.normal(size=(50, 4)):
        q /= np.linalg.norm(q)
        back = outputs.rot_to_quat(quat_to_matrix(q))
        np.testing.assert_allclose(quat_to_matrix(back), quat_to_matrix(q), atol=1e-9)
        assert back[3] >= 0


def test_path_holds_sample_zero_with_future_pose_stamps(outputs):
    m = outputs.to_path(result(), "base_link")
    assert h.stamp_us(m.header.stamp) == T0 and len(m.poses) == 64
    assert [h.stamp_us(p.header.stamp) - T0 for p in m.poses[:2]] == [100_000, 200_000]
    assert m.poses[-1].pose.position.x == 64.0


def test_markers_hold_one_line_per_sample_and_the_reasoning_text(outputs):
    m = outputs.to_markers(result(), "base_link")
    assert m.markers[0].action == m.markers[0].DELETEALL  # the previous window's markers go away
    lines = [mk for mk in m.markers if mk.type == mk.LINE_STRIP]
    texts = [mk for mk in m.markers if mk.type == mk.TEXT_VIEW_FACING]
    assert len(lines) == 2 and all(len(mk.points) == 64 for mk in lines)
    assert [t.text for t in texts] == ["Slow down for the pedestrian."]
    assert all(h.stamp_us(mk.header.stamp) == T0 for mk in m.markers)


def test_reasoning_and_latency_fields(outputs):
    r = result()
    rm = outputs.to_reasoning(r)
    assert (rm.text, rm.num_tokens, rm.verify_passes) == ("Slow down for the pedestrian.", 9, 5)
    assert math.isclose(rm.tokens_per_pass, 1.8, rel_tol=1e-6)
    lat = outputs.to_latency(r, pipeline_latency_ms=40.0, dropped_frames=3, streaming=True,
                             flow_schedule="adaptive")
    assert h.stamp_us(lat.header.stamp) == T0
    parts = [lat.preprocess_ms, lat.encode_ms, lat.prefill_ms, lat.decode_ms, lat.action_ms, lat.other_ms]
    assert parts == [1.0, 2.0, 3.0, 4.0, 5.0, 1.5] and lat.total_ms == 16.5
    assert (lat.dropped_frames, lat.full_prefill, lat.num_samples, lat.flow_schedule) == (3, True, 2, "adaptive")
    assert lat.verify_passes == 5 and math.isclose(lat.tokens_per_pass, 1.8, rel_tol=1e-6)  # tau surfaced
    # the action stage's work: a result without the drafter's fields (an engine_factory backend) reads as off
    assert (lat.flow_evaluations, lat.action_draft) == (0, "off")
    drafted = outputs.to_latency(result(flow_evaluations=1, action_draft="accepted"))
    assert (drafted.flow_evaluations, drafted.action_draft) == (1, "accepted")


def test_stages_exceeding_the_total_by_rounding_raise_the_total(outputs):
    r = result(timings_ms={"preprocess": 1.0, "encode": 2.0, "prefill": 3.0, "decode": 4.0, "action": 5.0,
                           "total": 14.99})
    lat = outputs.to_latency(r)
    assert lat.other_ms == 0.0 and lat.total_ms == 15.0


@pytest.mark.parametrize("bad", [
    dict(xyz=np.full((2, 64, 3), np.nan, np.float32)),
    dict(rot=np.full((2, 64, 3, 3), np.inf, np.float32)),
    dict(xyz=np.zeros((64, 3), np.float32)),
    dict(rot=np.zeros((2, 63, 3, 3), np.float32)),
    dict(timings_ms={"total": float("nan")}),
    dict(timings_ms={"decode": -1.0, "total": 3.0}),
    dict(reasoning=None),
])
def test_check_result_refuses_garbage(outputs, bad):
    with pytest.raises(outputs.InvalidResult):
        outputs.check_result(result(**bad))


def test_check_result_accepts_a_good_result(outputs):
    outputs.check_result(result())
