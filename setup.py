"""pip entry point; metadata lives in setup.cfg. Dependencies come from requirements.txt (single source).

ROS users build with colcon instead (scripts/build_ros.sh): package.xml selects ament_cmake.
"""
from pathlib import Path

from setuptools import setup


def _requirements(path: Path) -> list:
    if not path.is_file():
        return []
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            reqs.append(line)
    return reqs


here = Path(__file__).resolve().parent
setup(
    install_requires=_requirements(here / "requirements.txt"),
    extras_require={"ros": _requirements(here / "requirements-ros.txt")},
)
