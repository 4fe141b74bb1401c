"""StepResult -> ROS messages (Trajectory, Path, MarkerArray, Reasoning, StageLatency).

Every message carries the stamp of the input window (t0), never the publish time: consumers compare the
prediction with the world as it was at t0. ``check_result`` is the gate before anything is built: a
result with non-finite or mis-shaped numbers is refused so nothing garbage leaves the node.
"""
from __future__ import annotations

import math

import numpy as np
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion
from nav_msgs.msg import Path
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from flashdrive_ros.msg import Reasoning, StageLatency, Trajectory, TrajectorySample

TIME_STEP_S = 0.1
STAGES = ("preprocess", "encode", "prefill", "decode", "action")


class InvalidResult(ValueError):
    pass


def check_result(result) -> None:
    """Raise InvalidResult unless the StepResult holds K x N finite poses and finite timings."""
    xyz = np.asarray(result.xyz)
    rot = np.asarray(result.rot)
    if xyz.ndim != 3 or xyz.shape[-1] != 3 or xyz.shape[0] < 1 or xyz.shape[1] < 1:
        raise InvalidResult(f"trajectory has shape {xyz.shape}, expected [K, N, 3]")
    if rot.shape != xyz.shape[:2] + (3, 3):
        raise InvalidResult(f"rotations have shape {rot.shape}, expected {xyz.shape[:2] + (3, 3)}")
    if not (np.all(np.isfinite(xyz)) and np.all(np.isfinite(rot))):
        raise InvalidResult("non-finite trajectory")
    t = result.timings_ms
    vals = [t.get(k, 0.0) for k in STAGES] + [t.get("total", 0.0)]
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        raise InvalidResult(f"invalid stage timings {t}")
    if not isinstance(result.reasoning, str):
        raise InvalidResult("reasoning is not a string")


def stamp_from_us(t_us: int) -> Time:
    t_us = int(t_us)
    return Time(sec=t_us // 1_000_000, nanosec=(t_us % 1_000_000) * 1000)


def stamp_to_us(stamp) -> int:
    return int(stamp.sec) * 1_000_000 + int(stamp.nanosec) // 1000


def _duration_s(s: float) -> Duration:
    ns = int(round(s * 1e9))
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def rot_to_quat(r: np.ndarray):
    """3x3 rotation -> (x, y, z, w), w >= 0 (Shepperd: branch on the largest diagonal term)."""
    r = np.asarray(r, dtype=np.float64)
    tr = r[0, 0] + r[1, 1] + r[2, 2]
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = ((r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s, 0.25 * s)
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = math.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2]) * 2
        q = (0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s, (r[2, 1] - r[1, 2]) / s)
    elif r[1, 1] > r[2, 2]:
        s = math.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2]) * 2
        q = ((r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s, (r[0, 2] - r[2, 0]) / s)
    else:
        s = math.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1]) * 2
        q = ((r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s, (r[1, 0] - r[0, 1]) / s)
    q = np.array(q)
    q /= np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    return tuple(float(v) for v in q)


def _pose(p, r) -> Pose:
    x, y, z, w = rot_to_quat(r)
    return Pose(position=Point(x=float(p[0]), y=float(p[1]), z=float(p[2])),
                orientation=Quaternion(x=x, y=y, z=z, w=w))


def _header(t0_us: int, frame_id: str) -> Header:
    return Header(stamp=stamp_from_us(t0_us), frame_id=frame_id)


def to_trajectory(result, frame_id: str = "base_link") -> Trajectory:
    xyz, rot = np.asarray(result.xyz), np.asarray(result.rot)
    n = xyz.shape[1]
    msg = Trajectory(header=_header(result.t0_us, frame_id), time_step=TIME_STEP_S)
    msg.time_from_start = [_duration_s((k + 1) * TIME_STEP_S) for k in range(n)]
    msg.samples = [TrajectorySample(poses=[_pose(xyz[s, k], rot[s, k]) for k in range(n)])
                   for s in range(xyz.shape[0])]
    return msg


def to_path(result, frame_id: str = "base_link") -> Path:
    """Sample 0 as nav_msgs/Path; pose k is stamped t0 + (k+1)*0.1 s (when the ego should be there)."""
    xyz, rot = np.asarray(result.xyz), np.asarray(result.rot)
    msg = Path(header=_header(result.t0_us, frame_id))
    step_us = int(TIME_STEP_S * 1e6)
    msg.poses = [PoseStamped(header=_header(result.t0_us + (k + 1) * step_us, frame_id),
                             pose=_pose(xyz[0, k], rot[0, k])) for k in range(xyz.shape[1])]
    return msg


def to_markers(result, frame_id: str = "base_link", namespace: str = "flashdrive") -> MarkerArray:
    """One LINE_STRIP per sample (sample 0 green and thicker) and the reasoning as a text label above
    the ego. Fixed ids, so each window replaces the previous one in RViz."""
    xyz = np.asarray(result.xyz)
    header = _header(result.t0_us, frame_id)
    markers = [Marker(header=header, ns=namespace, id=0, action=Marker.DELETEALL)]
    for s in range(xyz.shape[0]):
        m = Marker(header=header, ns=namespace + "/trajectory", id=s, type=Marker.LINE_STRIP,
                   action=Marker.ADD, frame_locked=True)
        m.pose.orientation.w = 1.0
        m.scale.x = 0.3 if s == 0 else 0.1
        m.color = ColorRGBA(r=0.1, g=0.9, b=0.2, a=1.0) if s == 0 else ColorRGBA(r=0.3, g=0.6, b=1.0, a=0.6)
        m.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in xyz[s]]
        markers.append(m)
    text = Marker(header=header, ns=namespace + "/reasoning", id=0, type=Marker.TEXT_VIEW_FACING,
                  action=Marker.ADD, frame_locked=True, text=result.reasoning or "(no reasoning)")
    text.pose.position.z = 3.0
    text.pose.orientation.w = 1.0
    text.scale.z = 0.6
    text.color = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)
    markers.append(text)
    return MarkerArray(markers=markers)


def to_reasoning(result, frame_id: str = "base_link") -> Reasoning:
    return Reasoning(header=_header(result.t0_us, frame_id), text=result.reasoning,
                     num_tokens=int(result.num_tokens), verify_passes=int(result.verify_passes),
                     tokens_per_pass=float(result.tokens_per_pass))


def to_latency(result, frame_id: str = "base_link", *, pipeline_latency_ms: float = 0.0,
               dropped_frames: int = 0, streaming: bool = False, speculative: bool = False,
               cuda_graphs: bool = False, flow_schedule: str = "uniform") -> StageLatency:
    """Stage timings; other_ms absorbs what the stages do not cover so the parts sum to total_ms
    (when timer granularity makes the stages exceed the total, total is raised to their sum)."""
    t = result.timings_ms
    stages = {k: float(t.get(k, 0.0)) for k in STAGES}
    total = float(t.get("total", 0.0))
    other = total - sum(stages.values())
    if other < 0:
        total, other = sum(stages.values()), 0.0
    xyz = np.asarray(result.xyz)
    return StageLatency(header=_header(result.t0_us, frame_id),
                        preprocess_ms=stages["preprocess"], encode_ms=stages["encode"],
                        prefill_ms=stages["prefill"], decode_ms=stages["decode"], action_ms=stages["action"],
                        other_ms=other, total_ms=total, pipeline_latency_ms=float(pipeline_latency_ms),
                        dropped_frames=int(dropped_frames), full_prefill=bool(result.full_prefill),
                        streaming=bool(streaming), speculative=bool(speculative), cuda_graphs=bool(cuda_graphs),
                        flow_schedule=flow_schedule, num_samples=int(xyz.shape[0]),
                        verify_passes=int(result.verify_passes),
                        tokens_per_pass=float(result.tokens_per_pass),
                        # engines from engine_factory may predate the action drafter's fields
                        flow_evaluations=int(getattr(result, "flow_evaluations", 0)),
                        action_draft=str(getattr(result, "action_draft", "off")))
