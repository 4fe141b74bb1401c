"""Every parameter of the drive node, declared in one place (name, default, description).

config/drive.yaml mirrors this table (a test checks that they agree). This module does not import ROS:
``declare_all(node)`` takes the node and imports the descriptor type lazily, ``DriveParams`` is a plain
dataclass the node and the tests share.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

CAMERA_NAMES = ("camera_cross_left_120fov", "camera_front_wide_120fov",
                "camera_cross_right_120fov", "camera_front_tele_30fov")


def _camera_topics(transport: str = "compressed") -> list:
    suffix = "image_raw/compressed" if transport == "compressed" else "image_raw"
    return [f"/flashdrive/camera/{name}/{suffix}" for name in CAMERA_NAMES]


# (name, default, description). Order = order in config/drive.yaml.
PARAMETERS: tuple = (
    # --- inputs
    ("camera_topics", _camera_topics(),
     "Four camera topics in Alpamayo camera order (cross_left, front_wide, cross_right, front_tele)."),
    ("image_transport", "compressed",
     "'compressed' (sensor_msgs/CompressedImage, JPEG/PNG) or 'raw' (sensor_msgs/Image rgb8/bgr8/mono8)."),
    ("odom_topic", "/flashdrive/odom", "nav_msgs/Odometry of base_link in a fixed frame (>= 10 Hz)."),
    ("clip_boundary_topic", "/flashdrive/replay/clip_boundary",
     "flashdrive_ros/ClipBoundary topic; every message resets the streaming state. Empty = not subscribed."),
    ("image_width", 0, "Expected image width in pixels; 0 = take the size of the anchor frame of each window."),
    ("image_height", 0, "Expected image height in pixels; 0 = take the size of the anchor frame of each window."),
    ("decode_threads", 4,
     "Threads that decode the frames of a window in parallel (Pillow releases the GIL while it decodes; "
     "a 1920x1080 JPEG takes ~10-20 ms on one core). 1 = decode in the worker thread."),
    ("jpeg_decoder", "pillow",
     "'pillow' (host threads, see decode_threads) or 'nvjpeg' (torchvision's GPU decoder on the engine's CUDA "
     "device, ~15x faster at 1920x1080; JPEG only, others stay on Pillow; unavailable -> Pillow and a warning)."),
    # --- synchronisation
    ("anchor_camera", 1, "Index (0-3) into camera_topics of the camera whose frames define t0."),
    ("inference_period_ms", 100.0, "Stride between windows (t0 grid); the model is trained on 0.1 s."),
    ("sync_tolerance_ms", 50.0,
     "A camera frame is used for target time t only if t - stamp <= this (last frame at or before t)."),
    ("missing_camera_policy", "skip",
     "What to do when a camera has no frame within tolerance: 'skip' the window, 'repeat_last' frame, "
     "or 'black' image."),
    ("max_frame_age_ms", 2000.0,
     "Skip windows whose t0 is older than this relative to the node clock (0 = never). Use sim time with replay."),
    ("odom_max_staleness_ms", 100.0, "Newest odometry may lag t0 by at most this (then extrapolated)."),
    ("time_jump_ms", 1000.0,
     "An input stamp this far behind the previous one is a clock reset / loop (reset); less is out-of-order "
     "(dropped)."),
    ("reset_gap_ms", 350.0,
     "Reset the streaming state when a window's t0 is more than this after the previous processed one. "
     "The engine itself continues its stream across gaps of 1-3 windows (0.1/0.2/0.3 s +- 50 ms: "
     "dropped windows on slow hardware, re-encoding only the new frames) and resets on larger ones, so "
     "the default 350 ms lets the engine decide; lower it (e.g. 150) to force a full prefill after any drop."),
    # --- model / engine
    ("model", "tiny", "'tiny' (shipped checkpoint) or a checkpoint directory (config.json + safetensors)."),
    ("device", "cpu", "torch device, e.g. 'cpu', 'cuda', 'cuda:0'."),
    ("dtype", "float32", "'float32', 'bfloat16' or 'float16'."),
    ("streaming", True, "Streaming prefill (reuse the KV cache of previous windows)."),
    ("speculative", False, "Speculative reasoning decoding (DFlash drafter)."),
    ("temporal_draft", 24,
     "With speculative greedy decoding: verify this many ids of the previous window's reasoning as a draft "
     "block inside the streaming prefill (lossless; saves verify passes when the reasoning repeats; 0 = off)."),
    ("flow_schedule", "uniform", "Flow-matching step schedule: 'uniform' (10 steps) or 'adaptive'."),
    ("action_draft_m", 0.0,
     "Speculative action draft (lossy; 0 = off): when the reasoning repeats, check the previous window's plan "
     "with one expert evaluation and publish it instead of running the flow if the model's estimate stays "
     "within this many metres of it over the whole horizon (see docs/SPECULATIVE.md, 'Action draft')."),
    ("action_draft_check_time", 0.5, "Flow time in [0, 1) at which the action draft is checked."),
    ("action_draft_max_reuse", 4, "Drafted windows in a row before the full flow must run again (>= 1)."),
    ("cuda_graphs", False, "Capture CUDA graphs for the fixed-shape stages (CUDA devices only)."),
    ("num_samples", 1, "Trajectory samples K per window (samples[0] is the one to execute)."),
    ("max_new_tokens", 64, "Maximum reasoning tokens per window."),
    ("temperature", 0.0, "Reasoning sampling temperature (0 = greedy)."),
    ("top_p", 0.98, "Nucleus sampling threshold when temperature > 0."),
    ("seed", 0, "Random seed of the engine."),
    ("engine_factory", "",
     "'module:callable' building the engine with DriveEngine.from_pretrained's arguments; empty = "
     "flashdrive_ros.engine.DriveEngine.from_pretrained. For tests and alternative backends."),
    # --- outputs
    ("frame_id", "base_link", "frame_id of all outputs (the ego frame at t0)."),
    ("diagnostics_period_s", 1.0, "Period of the /diagnostics status message."),
    ("log_throttle_s", 5.0, "Minimum interval between repeated warning logs of the same kind."),
)

DEFAULTS = {name: default for name, default, _ in PARAMETERS}
DESCRIPTIONS = {name: desc for name, _, desc in PARAMETERS}


@dataclass
class DriveParams:
    camera_topics: list
    image_transport: str
    odom_topic: str
    clip_boundary_topic: str
    image_width: int
    image_height: int
    decode_threads: int
    jpeg_decoder: str
    anchor_camera: int
    inference_period_ms: float
    sync_tolerance_ms: float
    missing_camera_policy: str
    max_frame_age_ms: float
    odom_max_staleness_ms: float
    time_jump_ms: float
    reset_gap_ms: float
    model: str
    device: str
    dtype: str
    streaming: bool
    speculative: bool
    temporal_draft: int
    flow_schedule: str
    action_draft_m: float
    action_draft_check_time: float
    action_draft_max_reuse: int
    cuda_graphs: bool
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    engine_factory: str
    frame_id: str
    diagnostics_period_s: float
    log_throttle_s: float

    @classmethod
    def from_dict(cls, values: dict) -> "DriveParams":
        unknown = set(values) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown drive node parameters: {sorted(unknown)}")
        merged = {**DEFAULTS, **values}
        p = cls(**{f.name: merged[f.name] for f in fields(cls)})
        p.validate()
        return p

    def validate(self) -> None:
        """Raise ValueError naming the offending parameter."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(len(self.camera_topics) == 4 and all(self.camera_topics),
             f"camera_topics needs 4 non-empty topics, got {list(self.camera_topics)}")
        need(self.image_transport in ("compressed", "raw"), "image_transport must be 'compressed' or 'raw'")
        need(0 <= self.anchor_camera < 4, "anchor_camera must be in 0..3")
        need(self.inference_period_ms > 0, "inference_period_ms must be > 0")
        need(self.sync_tolerance_ms >= 0, "sync_tolerance_ms must be >= 0")
        need(self.missing_camera_policy in ("skip", "repeat_last", "black"),
             "missing_camera_policy must be 'skip', 'repeat_last' or 'black'")
        need(self.max_frame_age_ms >= 0, "max_frame_age_ms must be >= 0")
        need(self.odom_max_staleness_ms >= 0, "odom_max_staleness_ms must be >= 0")
        need(self.time_jump_ms > 0 and self.reset_gap_ms > 0, "time_jump_ms and reset_gap_ms must be > 0")
        need(self.dtype in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16")
        need(self.flow_schedule in ("uniform", "adaptive"), "flow_schedule must be 'uniform' or 'adaptive'")
        need(self.num_samples >= 1 and self.max_new_tokens >= 1, "num_samples and max_new_tokens must be >= 1")
        need(self.temporal_draft >= 0, "temporal_draft must be >= 0 (0 = off)")
        need(self.action_draft_m >= 0, "action_draft_m must be >= 0 metres (0 = off)")
        need(0.0 <= self.action_draft_check_time < 1.0, "action_draft_check_time must be in [0, 1)")
        need(self.action_draft_max_reuse >= 1, "action_draft_max_reuse must be >= 1")
        need(self.image_width >= 0 and self.image_height >= 0, "image_width/height must be >= 0")
        need(self.jpeg_decoder in ("pillow", "nvjpeg"), f"jpeg_decoder must be 'pillow' or 'nvjpeg', got "
                                                         f"{self.jpeg_decoder!r}")
        need(1 <= self.decode_threads <= 64, f"decode_threads must be in 1..64, got {self.decode_threads}")
        need(bool(self.model), "model must be 'tiny' or a checkpoint directory")
        need(self.diagnostics_period_s > 0, "diagnostics_period_s must be > 0")

    def engine_kwargs(self) -> dict:
        """Keyword arguments of DriveEngine.from_pretrained (dtype as a string; the node maps it)."""
        kw = dict(device=self.device, dtype=self.dtype, streaming=self.streaming,
                  flow_schedule=self.flow_schedule, num_samples=self.num_samples,
                  speculative=self.speculative, max_new_tokens=self.max_new_tokens,
                  temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        if self.cuda_graphs:  # only passed when asked for: older engines do not take the argument
            kw["cuda_graphs"] = True
        if self.temporal_draft != DEFAULTS["temporal_draft"]:  # likewise: only a change is passed
            kw["temporal_draft"] = self.temporal_draft
        if self.action_draft_m > 0:  # likewise: only when switched on
            kw.update(action_draft_m=float(self.action_draft_m), action_draft_check_time=float(self.action_draft_check_time),
                      action_draft_max_reuse=int(self.action_draft_max_reuse))
        return kw


def declare_all(node) -> DriveParams:
    """Declare every parameter on an rclpy node (with its description) and read them back."""
    from rcl_interfaces.msg import ParameterDescriptor

    values: dict[str, Any] = {}
    for name, default, desc in PARAMETERS:
        node.declare_parameter(name, default, ParameterDescriptor(description=desc))
        values[name] = node.get_parameter(name).value
    values["camera_topics"] = list(values["camera_topics"])
    return DriveParams.from_dict(values)


def render_yaml() -> str:
    """config/drive.yaml text from PARAMETERS (python -m flashdrive_ros.nodes.params > config/drive.yaml)."""
    import json
    import textwrap

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "".join(f"\n      - {json.dumps(x)}" for x in v)
        return repr(v)

    out = ["# Parameters of the drive node. Generated from flashdrive_ros/nodes/params.py (the one place they",
           "# are declared): python -m flashdrive_ros.nodes.params > config/drive.yaml",
           "# Use: python -m flashdrive_ros.nodes.drive_node --ros-args --params-file config/drive.yaml",
           "/**:", "  ros__parameters:"]
    for name, default, desc in PARAMETERS:
        out += [f"    # {line}" for line in textwrap.wrap(desc, 100)]
        out.append(f"    {name}: {fmt(default)}")
    out += ["    # QoS overrides (rclpy QoSOverridingOptions, keys qos_overrides.<topic>.<publisher|subscription>.*):",
            "    # inputs default to best effort (cameras depth 5, odometry depth 50), outputs to reliable depth 10.",
            "    # qos_overrides:",
            "    #   /flashdrive/odom:",
            "    #     subscription:",
            "    #       reliability: reliable",
            "    #       depth: 50"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_yaml(), end="")
