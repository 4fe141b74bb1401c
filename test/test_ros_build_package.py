"""colcon build of the hybrid package: generated messages match msg/*.msg, executables and launch/config
are installed where `ros2 run` / `ros2 launch` look, and launch files pass only real node parameters."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from flashdrive_ros.nodes import ros_env

REPO = ros_env.REPO_ROOT
MSG_FILES = sorted((REPO / "msg").glob("*.msg"))
EXECUTABLES = ("drive_node", "replay_node", "clip_to_bag")


def _build_tools_missing():
    venv_bin = Path(sys.executable).parent
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if not (venv_bin / "colcon").exists() and shutil.which("colcon") is None:
        return "colcon is not installed (pip install -r requirements-ros.txt)"
    try:
        import rosidl_generator_py  # noqa: F401
    except ImportError:
        return "rosidl generators are not installed (pip install -r requirements-ros.txt)"
    return None


@pytest.fixture(scope="module")
def msg_module():
    """The built messages; builds the repo's install/ with scripts/build_ros.sh if it is missing."""
    missing = _build_tools_missing()
    if ros_env.python_dir() is None:
        if missing:
            pytest.skip(f"cannot build flashdrive_ros messages: {missing}")
        proc = subprocess.run(["bash", str(REPO / "scripts" / "build_ros.sh"), "--no-install"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ros_env.load_messages()


_PRIMITIVE = {"bool": "boolean", "float32": "float", "float64": "double", "byte": "octet", "char": "uint8"}


def parse_msg(path: Path) -> dict:
    """field name -> rosidl type string as reported by get_fields_and_field_types()."""
    fields = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        typ, name = line.split()[:2]
        array = typ.endswith("[]")
        base = typ[:-2] if array else typ
        if "/" in base:
            base = base.replace("/msg/", "/")                       # pkg/Type
        elif base[0].isupper():
            base = f"flashdrive_ros/{base}"                          # same-package type
        else:
            base = _PRIMITIVE.get(base, base)
        fields[name] = f"sequence<{base}>" if array else base
    return fields


def test_msg_files_exist():
    names = {p.stem for p in MSG_FILES}
    assert {"Trajectory", "TrajectorySample", "Reasoning", "StageLatency", "ClipBoundary"} <= names


@pytest.mark.parametrize("msg_file", MSG_FILES, ids=lambda p: p.stem)
def test_generated_message_matches_msg_file(msg_module, msg_file):
    cls = getattr(msg_module, msg_file.stem)
    assert cls.get_fields_and_field_types() == parse_msg(msg_file), \
        f"install/ is stale for {msg_file.name}: rerun scripts/build_ros.sh"


def test_messages_serialise_through_the_rmw_typesupport(msg_module):
    from geometry_msgs.msg import Pose
    from rclpy.serialization import deserialize_message, serialize_message
    traj = msg_module.Trajectory()
    traj.header.frame_id = "base_link"
    traj.time_step = 0.1
    sample = msg_module.TrajectorySample()
    sample.poses = [Pose() for _ in range(3)]
    sample.poses[2].position.x = 4.5
    traj.samples = [sample]
    back = deserialize_message(serialize_message(traj), msg_module.Trajectory)
    assert back.header.frame_id == "base_link" and back.samples[0].poses[2].position.x == 4.5
    b = msg_module.ClipBoundary(clip_id="c", loop_index=2, bag_index=1, reason="loop")
    assert deserialize_message(serialize_message(b), msg_module.ClipBoundary).reason == "loop"


def test_install_layout_for_ros2_run_and_launch(msg_module):
    prefix = ros_env.package_prefix()
    for exe in EXECUTABLES:
        path = prefix / "lib" / "flashdrive_ros" / exe
        assert path.is_file() and path.stat().st_mode & 0o111, f"{path} missing or not executable"
        assert path.read_text().startswith("#!/usr/bin/env python3\n")   # venv interpreter, not a pinned one
    share = prefix / "share" / "flashdrive_ros"
    assert (share / "package.xml").is_file()
    for name in ("drive.launch.py", "replay.launch.py"):
        assert (share / "launch" / name).is_file()
    assert (share / "config" / "drive.yaml").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "flashdrive_ros").is_file()


def test_installed_executable_runs(msg_module):
    exe = ros_env.package_prefix() / "lib" / "flashdrive_ros" / "clip_to_bag"
    proc = subprocess.run([sys.executable, str(exe), "--help"], env=ros_env.subprocess_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--dataset" in proc.stdout and "--clip" in proc.stdout


def test_package_xml_selects_ament_cmake_despite_setup_py():
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.findtext("name") == "flashdrive_ros"
    assert root.find("export").findtext("build_type") == "ament_cmake"
    assert "rosidl_interface_packages" in [e.text for e in root.findall("member_of_group")]
    assert (REPO / "setup.py").is_file()


def test_cmake_generates_every_msg_file():
    listed = set(re.findall(r'"msg/(\w+)\.msg"', (REPO / "CMakeLists.txt").read_text()))
    assert listed == {p.stem for p in MSG_FILES}


def _node_parameter_keys(launch_file: Path, executable: str) -> set:
    """Keys of the parameter dicts passed to Node(executable=...) in a launch file (static AST read)."""
    tree = ast.parse(launch_file.read_text())
    keys = set()
    for call in ast.walk(tree):
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Node"):
            continue
        kw = {k.arg: k.value for k in call.keywords}
        if not (isinstance(kw.get("executable"), ast.Constant) and kw["executable"].value == executable):
            continue
        for item in getattr(kw.get("parameters"), "elts", []):
            if isinstance(item, ast.Dict):
                keys |= {k.value for k in item.keys if isinstance(k, ast.Constant)}
    return keys


def test_launch_files_only_set_declared_parameters():
    from flashdrive_ros.nodes.params import PARAMETERS
    from flashdrive_ros.nodes.replay_node import PARAMS
    drive_keys = _node_parameter_keys(REPO / "launch" / "drive.launch.py", "drive_node")
    replay_keys = _node_parameter_keys(REPO / "launch" / "replay.launch.py", "replay_node")
    assert drive_keys and replay_keys
    assert drive_keys - {"use_sim_time"} <= {name for name, _, _ in PARAMETERS}
    assert replay_keys - {"use_sim_time"} <= {name for name, _, _ in PARAMS}
