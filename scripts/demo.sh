#!/usr/bin/env bash
# The main job on the embedded default: set-up, then a synthetic PhysicalAI-AV clip is converted to a
# rosbag2 bag and replayed through the drive node (tiny model, streaming); trajectory, reasoning and
# per-stage latency are printed for every window. Extra args go to flashdrive_ros.replay_demo (--help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
. .venv/bin/activate
export PYTHONUNBUFFERED=1
exec python -m flashdrive_ros.replay_demo "$@"
