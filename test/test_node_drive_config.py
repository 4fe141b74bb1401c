"""Drive node configuration: QoS overrides through parameters, sensor-data QoS in / reliable out, and
invalid parameters refused at start-up with the parameter's name."""
import random

import numpy as np
import pytest

import test_node_harness as h

pytestmark = [pytest.mark.ros, pytest.mark.skipif(h.ROS_REASON is not None, reason=str(h.ROS_REASON))]


@pytest.fixture
def ctx():
    import rclpy
    h.ros_env.load_messages()
    c = rclpy.Context()
    rclpy.init(context=c, domain_id=random.randint(110, 230))
    yield c
    rclpy.shutdown(context=c)


def make_node(ctx, **params):
    from rclpy.parameter import Parameter

    from flashdrive_ros.nodes.drive_node import DriveNode
    return DriveNode(engine_factory=h.KinematicEngine.from_pretrained, context=ctx,
                     parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])


def test_default_qos_is_best_effort_in_and_reliable_out(ctx):
    from rclpy.qos import ReliabilityPolicy
    node = make_node(ctx)
    try:
        subs = {s.topic_name: s.qos_profile for s in node.subscriptions}
        pubs = {p.topic_name: p.qos_profile for p in node.publishers}
        cam = node.params.camera_topics[0]
        assert subs[cam].reliability == ReliabilityPolicy.BEST_EFFORT
        assert subs["/flashdrive/odom"].depth == 50
        assert pubs["/drive_node/trajectory"].reliability == ReliabilityPolicy.RELIABLE
        assert pubs["/diagnostics"].reliability == ReliabilityPolicy.RELIABLE
    finally:
        node.shutdown()
        node.destroy_node()


def test_qos_overrides_parameters_change_the_subscription(ctx):
    from rclpy.qos import ReliabilityPolicy
    node = make_node(ctx, **{"qos_overrides./flashdrive/odom.subscription.reliability": "reliable",
                             "qos_overrides./flashdrive/odom.subscription.depth": 7})
    try:
        odom = [s for s in node.subscriptions if s.topic_name == "/flashdrive/odom"][0].qos_profile
        assert odom.reliability == ReliabilityPolicy.RELIABLE and odom.depth == 7
    finally:
        node.shutdown()
        node.destroy_node()


@pytest.mark.parametrize("name,value", [("missing_camera_policy", "zeros"), ("anchor_camera", 7),
                                        ("camera_topics", ["/only/one"])])
def test_invalid_parameter_is_refused_at_start(ctx, name, value):
    with pytest.raises(ValueError, match=name):
        make_node(ctx, **{name: value})


def test_process_exits_with_a_clear_error_on_an_invalid_parameter():
    import subprocess
    import sys
    env = h.ros_env.subprocess_env(domain_id=random.randint(110, 230))
    proc = subprocess.run([sys.executable, "-m", "flashdrive_ros.nodes.drive_node", "--ros-args",
                           "-p", "missing_camera_policy:=zeros"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "invalid configuration: missing_camera_policy" in proc.stderr
    assert "Traceback" not in proc.stderr


def _window(ctx_t0_us, make_msg):
    """A complete window of 4 cameras x 4 frames at 0.1 s spacing, frames[c][k] = make_msg(c, stamp)."""
    from flashdrive_ros.nodes.camera_sync import Window
    stamps = [[ctx_t0_us - (3 - k) * 100_000 for k in range(4)] for _ in range(4)]
    return Window(t0_us=ctx_t0_us, frames=[[make_msg(c, s) for s in stamps[c]] for c in range(4)], stamps_us=stamps)


def _jpeg_msg(c, stamp):
    from sensor_msgs.msg import CompressedImage
    return CompressedImage(format="jpeg", data=h.jpeg(h.camera_image(c, stamp * 1e-6)))


@pytest.mark.parametrize("threads, meet", [(4, True), (1, False)])
def test_new_frames_of_a_window_decode_in_parallel(ctx, monkeypatch, threads, meet):
    """With decode_threads > 1 two decodes of one window run at the same time (they meet at a barrier);
    with 1 they run one after the other in the worker (the barrier times out)."""
    import threading

    from flashdrive_ros.nodes import drive_node
    barrier, met, real = threading.Barrier(2, timeout=2.0), [], drive_node.decode_image_msg

    def decode_meeting(msg, *a, **k):
        try:
            barrier.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            barrier.reset()
            met.append(False)
        return real(msg, *a, **k)

    monkeypatch.setattr(drive_node, "decode_image_msg", decode_meeting)
    node = make_node(ctx, decode_threads=threads)
    try:
        win = _window(2_000_000, lambda c, s: _jpeg_msg(c, s) if c < 2 and s == 2_000_000 else None)
        decoded = node._decode_all(win)  # the two t0 frames of cameras 0 and 1
        assert [isinstance(decoded[c][3], np.ndarray) for c in range(4)] == [True, True, False, False]
        assert all(met) == meet and len(met) == 2
    finally:
        node.shutdown()
        node.destroy_node()


def test_frames_are_decoded_once_and_shared_across_windows(ctx):
    """A frame recurs in 4 consecutive windows: it is decoded once and handed to the engine as the same
    (read-only) array each time, not copied into a new [4, 4, H, W, 3] array per window."""
    node = make_node(ctx, image_width=h.W, image_height=h.H)
    try:
        msgs = {}

        def msg(c, s):
            return msgs.setdefault((c, s), _jpeg_msg(c, s))

        first = node._frames(_window(2_000_000, msg))
        second = node._frames(_window(2_100_000, msg))
        for c in range(4):
            for k in range(3):  # frame k + 1 of the first window is frame k of the second
                assert second[c][k] is first[c][k + 1]
            assert not second[c][3].flags.writeable and second[c][3].shape == (h.H, h.W, 3)
    finally:
        node.shutdown()
        node.destroy_node()


def test_nvjpeg_decoder_unavailable_falls_back_to_pillow_with_a_warning(ctx):
    """jpeg_decoder 'nvjpeg' where it cannot run (no torchvision, or a CPU engine): a warning on /diagnostics
    saying why, and the frames decode on the host as before."""
    import time
    node = make_node(ctx, jpeg_decoder="nvjpeg")
    try:
        deadline = time.monotonic() + 30
        while node.model_state != "loaded" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.model_state == "loaded"
        assert node._gpu_decoder is None
        assert "decoding JPEG frames with Pillow" in node.last_error
        assert "torchvision" in node.last_error or "CUDA" in node.last_error
        win = _window(2_000_000, _jpeg_msg)
        assert all(isinstance(im, np.ndarray) for cam in node._frames(win) for im in cam)
    finally:
        node.shutdown()
        node.destroy_node()


def test_nvjpeg_frames_reach_the_engine_as_device_tensors(ctx):
    """With the GPU decoder (a stand-in here) the JPEG frames of a window are decoded as one batch, cached like
    host frames, and handed over as [H, W, 3] uint8 tensors."""
    import torch
    from test_node_image_decode import _nvjpeg_decoder
    node = make_node(ctx, image_width=h.W, image_height=h.H)
    try:
        node._gpu_decoder = _nvjpeg_decoder()
        msgs = {}
        first = node._frames(_window(2_000_000, lambda c, s: msgs.setdefault((c, s), _jpeg_msg(c, s))))
        second = node._frames(_window(2_100_000, lambda c, s: msgs.setdefault((c, s), _jpeg_msg(c, s))))
        assert node._gpu_decoder._decode_jpeg.batches == [16, 4]  # every frame once; then the 4 new ones
        assert all(isinstance(im, torch.Tensor) and tuple(im.shape) == (h.H, h.W, 3) for cam in second for im in cam)
        assert all(second[c][k] is first[c][k + 1] for c in range(4) for k in range(3))
        h.KinematicEngine().step(second, 2_100_000, np.zeros((16, 3)), np.tile(np.eye(3), (16, 1, 1)))
    finally:
        node.shutdown()
        node.destroy_node()
