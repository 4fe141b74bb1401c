"""Offline evaluation: trajectory/reasoning metrics, the clip × window loop, reports and the CLI.

Run `python -m flashdrive_ros.evaluation --help` (docs/EVALUATION.md).
"""
from .metrics import TrajectoryMetrics, ade, constant_velocity_prediction, trajectory_metrics
from .reasoning import exact_match, normalize_words, reasoning_agreement, token_f1

__all__ = ["TrajectoryMetrics", "ade", "constant_velocity_prediction", "trajectory_metrics",
           "exact_match", "normalize_words", "reasoning_agreement", "token_f1"]
