"""Find the colcon-built `flashdrive_ros` messages and prepare environments that can use them.

After `scripts/build_ros.sh`, `. install/setup.sh` is the ROS way. This module is for code that runs from
the source tree without sourcing anything (pytest, scripts):

    from flashdrive_ros.nodes import ros_env
    reason = ros_env.unavailable_reason()          # None when the messages can be used
    ros_env.load_messages()                        # in-process: `from flashdrive_ros.msg import ...` works
    env = ros_env.subprocess_env(domain_id=...)    # for child processes (nodes under test)

The install space is `$FLASHDRIVE_ROS_INSTALL` or `<repo>/install`.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import os
import sys
from pathlib import Path

PACKAGE = "flashdrive_ros"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Order matters for ctypes preloading: each library only needs ones loaded before it.
_TYPESUPPORT_LIBS = (
    "rosidl_generator_c",
    "rosidl_typesupport_c",
    "rosidl_typesupport_cpp",
    "rosidl_typesupport_introspection_c",
    "rosidl_typesupport_introspection_cpp",
    "rosidl_typesupport_fastrtps_c",
    "rosidl_typesupport_fastrtps_cpp",
    "rosidl_generator_py",
)


def install_base() -> Path:
    return Path(os.environ.get("FLASHDRIVE_ROS_INSTALL", REPO_ROOT / "install")).resolve()


def package_prefix() -> Path:
    return install_base() / PACKAGE


def python_dir() -> Path | None:
    """site-packages dir of the install space that holds flashdrive_ros/msg, or None."""
    hits = sorted(glob.glob(str(package_prefix() / "lib" / "python3*" / "site-packages")))
    for hit in hits:
        if (Path(hit) / PACKAGE / "msg" / "__init__.py").is_file():
            return Path(hit)
    return None


def unavailable_reason() -> str | None:
    """Why the built messages cannot be used here, or None if they can."""
    try:
        import rclpy  # noqa: F401
    except ImportError as exc:
        return f"rclpy is not importable ({exc}); install requirements-ros.txt"
    if _already_importable():
        return None
    if python_dir() is None:
        return (f"flashdrive_ros messages are not built: no {package_prefix()}/lib/python3*/site-packages/"
                f"{PACKAGE}/msg; run scripts/build_ros.sh")
    return None


def _already_importable() -> bool:
    try:
        importlib.import_module(f"{PACKAGE}.msg")
        return True
    except ImportError:
        return False


def load_messages():
    """Make `flashdrive_ros.msg` importable in this process and return the module.

    Adds the install space to the package path (the source `flashdrive_ros/__init__.py` uses
    pkgutil.extend_path, which only sees sys.path at import time) and preloads the typesupport libraries,
    because rmw finds them by dlopen(soname), which needs LD_LIBRARY_PATH unless they are already loaded.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    pydir = python_dir()
    if pydir is not None:
        import flashdrive_ros
        pkg_dir = str(pydir / PACKAGE)
        if pkg_dir not in flashdrive_ros.__path__:
            flashdrive_ros.__path__.append(pkg_dir)
        libdir = package_prefix() / "lib"
        for suffix in _TYPESUPPORT_LIBS:
            lib = libdir / f"lib{PACKAGE}__{suffix}.so"
            if lib.is_file():
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return importlib.import_module(f"{PACKAGE}.msg")


def _prepend(env: dict, key: str, *paths) -> None:
    parts = [str(p) for p in paths] + [p for p in env.get(key, "").split(os.pathsep) if p]
    seen, out = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    env[key] = os.pathsep.join(out)


def isolated_domain_id(seed: int | None = None) -> int:
    """A ROS_DOMAIN_ID derived from the pid, so concurrent test runs on one host do not cross-talk."""
    return 1 + ((os.getpid() if seed is None else seed) % 100)


def subprocess_env(domain_id: int | None = None, base: dict | None = None) -> dict:
    """Environment for a child process: source tree first on PYTHONPATH, then the built messages;
    install lib/ on LD_LIBRARY_PATH; discovery limited to this host; unbuffered output."""
    env = dict(os.environ if base is None else base)
    pydir = python_dir()
    _prepend(env, "PYTHONPATH", REPO_ROOT, *( [pydir] if pydir else [] ))
    if pydir is not None:
        _prepend(env, "LD_LIBRARY_PATH", package_prefix() / "lib")
        _prepend(env, "AMENT_PREFIX_PATH", package_prefix(), sys.prefix)
        _prepend(env, "PATH", Path(sys.executable).parent)
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = env.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    env["PYTHONUNBUFFERED"] = "1"
    # The ROS wheels re-exec Python once to set LD_LIBRARY_PATH; let the child do that itself with ours.
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    return env
