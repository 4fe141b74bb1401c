"""Drive node configuration: QoS overrides through parameters, sensor-data QoS in / reliable out, and
invalid parameters refused at start-up with the parameter's name."""
import random

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
