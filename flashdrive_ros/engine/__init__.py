"""Inference engine (model core, pipelines). Never imports ROS.

Public API: DriveEngine, StepResult, CAMERA_NAMES (see docs/DESIGN.md "Engine API"). They are
imported lazily so that light modules (config, tokens, ...) load without building the pipelines.
"""

__all__ = ["DriveEngine", "StepResult", "CAMERA_NAMES"]


def __getattr__(name):
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
