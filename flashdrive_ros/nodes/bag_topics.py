"""Topic names, frames, QoS and message builders shared by the clip->bag converter and the replay node.

The single source for the ROS interface table in docs/DESIGN.md ("ROS interfaces"). Messages are built as
`rosbags` typestore objects (pure Python, no ROS install needed) and serialised to CDR; the replay node
publishes those CDR bytes unchanged through rclpy.

Time: dataset times are clip-relative integer microseconds; ROS stamps are `epoch_ns + t_us * 1000`
(ROS time 0 means "unset" under use_sim_time, hence the fixed epoch). Bag log time == header stamp.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The repo-wide camera order (docs/DESIGN.md Conventions; = flashdrive_ros.data.camera.CAMERA_NAMES, checked by
# a test). Repeated here so the replay node does not import the data package (pandas, renderer: seconds).
CAMERA_NAMES = ("camera_cross_left_120fov", "camera_front_wide_120fov",
                "camera_cross_right_120fov", "camera_front_tele_30fov")

DEFAULT_EPOCH_NS = 1_700_000_000 * 10**9

# Topics.
TOPIC_PREFIX = "/flashdrive"
ODOM_TOPIC = f"{TOPIC_PREFIX}/odom"
TF_STATIC_TOPIC = "/tf_static"
GROUND_TRUTH_TOPIC = f"{TOPIC_PREFIX}/ground_truth/future"
CLOCK_TOPIC = "/clock"
CLIP_BOUNDARY_TOPIC = f"{TOPIC_PREFIX}/replay/clip_boundary"


def camera_topic(camera_name: str) -> str:
    return f"{TOPIC_PREFIX}/camera/{camera_name}/image_raw/compressed"


def camera_info_topic(camera_name: str) -> str:
    return f"{TOPIC_PREFIX}/camera/{camera_name}/camera_info"


# Frames.
ODOM_FRAME = "odom"        # the egomotion anchor frame (rig pose at clip start, yaw zeroed)
BASE_FRAME = "base_link"   # the rig frame: rear-axle centre on the ground, x forward, y left, z up

# Message types (rosbags / ROS names).
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
ODOMETRY = "nav_msgs/msg/Odometry"
TF_MESSAGE = "tf2_msgs/msg/TFMessage"
PATH = "nav_msgs/msg/Path"
CLOCK = "rosgraph_msgs/msg/Clock"
CLIP_BOUNDARY = "flashdrive_ros/msg/ClipBoundary"

# Bag custom metadata keys (metadata.yaml `custom_data`).
META_CLIP_ID = "flashdrive.clip_id"
META_EPOCH_NS = "flashdrive.epoch_ns"
META_FORMAT = "flashdrive.format"
FORMAT_VERSION = "flashdrive_bag/1"

# Ground truth: the Alpamayo future block, 64 poses at 0.1 s after t0 (dataset.md §8).
GT_STEPS = 64
GT_DT_US = 100_000
GT_HISTORY_US = 1_500_000   # a t0 also needs 1.5 s of ego history (16 poses) to be a model window


@dataclass(frozen=True)
class TopicQos:
    """QoS of a published topic: reliable always (REP-2003 publishers); latched topics transient_local."""
    depth: int = 10
    transient_local: bool = False


def qos_for(topic: str) -> TopicQos:
    if topic in (TF_STATIC_TOPIC, CLIP_BOUNDARY_TOPIC):
        return TopicQos(depth=1, transient_local=True)
    if topic == ODOM_TOPIC:
        return TopicQos(depth=50)
    return TopicQos(depth=10)


def bag_topic_types() -> dict:
    """Every topic a converted bag holds -> message type, in a stable order."""
    out = {}
    for name in CAMERA_NAMES:
        out[camera_topic(name)] = COMPRESSED_IMAGE
        out[camera_info_topic(name)] = CAMERA_INFO
    out[ODOM_TOPIC] = ODOMETRY
    out[TF_STATIC_TOPIC] = TF_MESSAGE
    out[GROUND_TRUTH_TOPIC] = PATH
    return out


# ---- time ------------------------------------------------------------------------------------------

def clip_us_to_ns(t_us: int, epoch_ns: int = DEFAULT_EPOCH_NS) -> int:
    t = int(t_us)
    if t < 0:
        raise ValueError(f"clip time must be >= 0 us, got {t}")
    return int(epoch_ns) + t * 1000


def ns_to_sec_nanosec(ns: int) -> tuple:
    ns = int(ns)
    return ns // 1_000_000_000, ns % 1_000_000_000


def stamp_to_ns(stamp) -> int:
    """header.stamp (rosbags or rclpy builtin_interfaces/Time) -> integer ns."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# ---- message builders (rosbags typestore objects) -------------------------------------------------

class MessageFactory:
    """Builds the bag's messages from numpy data with a rosbags typestore."""

    def __init__(self, typestore):
        self.ts = typestore
        self.T = typestore.types

    def serialize(self, msg) -> bytes:
        return bytes(self.ts.serialize_cdr(msg, msg.__msgtype__))

    def header(self, stamp_ns: int, frame_id: str):
        sec, nanosec = ns_to_sec_nanosec(stamp_ns)
        return self.T["std_msgs/msg/Header"](
            stamp=self.T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id)

    def _vec3(self, v):
        return self.T["geometry_msgs/msg/Vector3"](x=float(v[0]), y=float(v[1]), z=float(v[2]))

    def _quat(self, q):  # q = (x, y, z, w)
        return self.T["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))

    def _pose(self, xyz, quat):
        return self.T["geometry_msgs/msg/Pose"](
            position=self.T["geometry_msgs/msg/Point"](x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
            orientation=self._quat(quat))

    def compressed_image(self, stamp_ns: int, camera_name: str, jpeg: bytes):
        return self.T[COMPRESSED_IMAGE](header=self.header(stamp_ns, camera_name), format="jpeg",
                                        data=np.frombuffer(jpeg, dtype=np.uint8))

    def camera_info(self, stamp_ns: int, camera_name: str, width: int, height: int, cx: float, cy: float,
                    fw_poly) -> object:
        """f-theta cannot be expressed in CameraInfo: K uses the linear f-theta term as focal length
        (pixels per radian ~ pixels per unit tangent near the axis), `distortion_model="ftheta"` and d holds
        the forward polynomial fw_poly_0..4 (theta -> pixel radius) so consumers can rebuild the model."""
        fw = np.asarray(fw_poly, dtype=np.float64).ravel()
        f = float(fw[1]) if fw.size > 1 else 0.0
        k = np.array([f, 0.0, cx, 0.0, f, cy, 0.0, 0.0, 1.0], dtype=np.float64)
        p = np.array([f, 0.0, cx, 0.0, 0.0, f, cy, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=np.float64)
        roi = self.T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                          do_rectify=False)
        return self.T[CAMERA_INFO](header=self.header(stamp_ns, camera_name), height=int(height),
                                   width=int(width), distortion_model="ftheta", d=fw,
                                   k=k, r=np.eye(3).ravel(), p=p, binning_x=0, binning_y=0, roi=roi)

    def odometry(self, stamp_ns: int, xyz, quat, lin_vel_base, ang_vel_base):
        """Pose of base_link in odom; twist in base_link (nav_msgs/Odometry convention)."""
        cov = np.zeros(36, dtype=np.float64)
        T = self.T
        return T[ODOMETRY](
            header=self.header(stamp_ns, ODOM_FRAME), child_frame_id=BASE_FRAME,
            pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=self._pose(xyz, quat), covariance=cov),
            twist=T["geometry_msgs/msg/TwistWithCovariance"](
                twist=T["geometry_msgs/msg/Twist"](linear=self._vec3(lin_vel_base),
                                                   angular=self._vec3(ang_vel_base)),
                covariance=cov.copy()))

    def tf_static(self, stamp_ns: int, transforms: dict):
        """transforms: child frame -> (xyz, quat xyzw) of the child in base_link."""
        T = self.T
        items = [T["geometry_msgs/msg/TransformStamped"](
            header=self.header(stamp_ns, BASE_FRAME), child_frame_id=child,
            transform=T["geometry_msgs/msg/Transform"](translation=self._vec3(xyz), rotation=self._quat(q)))
            for child, (xyz, q) in transforms.items()]
        return T[TF_MESSAGE](transforms=items)

    def future_path(self, t0_ns: int, xyz, quats, dt_ns: int = GT_DT_US * 1000):
        """Ground-truth future: pose k of base_link at t0 + (k+1)*dt, in base_link at t0."""
        T = self.T
        poses = [T["geometry_msgs/msg/PoseStamped"](header=self.header(t0_ns + (k + 1) * dt_ns, BASE_FRAME),
                                                     pose=self._pose(xyz[k], quats[k]))
                 for k in range(len(xyz))]
        return T[PATH](header=self.header(t0_ns, BASE_FRAME), poses=poses)
