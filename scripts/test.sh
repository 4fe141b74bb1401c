#!/usr/bin/env bash
# Runs the whole test suite (CPU). Does all set-up first, so on a fresh machine this one command suffices.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
. .venv/bin/activate
if [ -f install/setup.sh ]; then
  # colcon's setup.sh reads unset variables; relax -u while sourcing it.
  set +u; . install/setup.sh; set -u
fi
export PYTHONUNBUFFERED=1
exec python -m pytest "$@"
