#!/usr/bin/env bash
# Build (once) and install mmcv 2.1.0 with its compiled ops into the given Python environment.
#
# mmcv publishes no wheels for current torch, so we build its source distribution. Two patches are
# needed on a current stack: torch >= 2.13 headers require C++20 (mmcv hard-codes -std=c++17), and its
# setup.py imports pkg_resources (setuptools < 70). The built wheel is cached per torch/CUDA build in
# $CONVMAE_CACHE (default ~/.cache/convmae_backbone) so later runs install it in seconds.
#
# Usage: tools/install_mmcv.sh [PYTHON]     (default: .venv/bin/python)
set -euo pipefail

PY=$(command -v "${1:-.venv/bin/python}") || { echo "[install_mmcv] no python at ${1:-.venv/bin/python}" >&2; exit 1; }
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
MMCV_VERSION=2.1.0
CACHE=${CONVMAE_CACHE:-$HOME/.cache/convmae_backbone}

if "$PY" - <<PYEOF 2>/dev/null; then
import mmcv, mmcv.ops  # noqa: F401  (mmcv.ops fails without the compiled extension)
assert mmcv.__version__ == "$MMCV_VERSION"
PYEOF
  echo "[install_mmcv] mmcv $MMCV_VERSION with ops already installed"
  exit 0
fi

# The cache key names the torch build and whether CUDA ops are compiled, so a wheel is only reused
# where it is ABI compatible.
read -r TORCH_TAG WITH_CUDA < <("$PY" - <<'PYEOF'
import os, torch
# CUDA ops are built where a GPU is visible (or FORCE_CUDA=1), not merely because nvcc exists.
cuda = torch.version.cuda is not None and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")
tag = torch.__version__.replace("+", "_") + ("-cu" + torch.version.cuda.replace(".", "") if cuda else "-cpu")
print(tag, int(cuda))
PYEOF
)
WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_TAG"
mkdir -p "$WHEEL_DIR"

if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
  echo "[install_mmcv] no cached wheel in $WHEEL_DIR: building mmcv $MMCV_VERSION from source (~10 min on 2 cores)"
  "$PY" -m pip install -q "setuptools<70" wheel ninja packaging
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary mmcv --no-build-isolation -d "$WORK" "mmcv==$MMCV_VERSION"
  tar -xzf "$WORK"/mmcv-$MMCV_VERSION.tar.gz -C "$WORK"
  SRC="$WORK/mmcv-$MMCV_VERSION"
  sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
  grep -q -- '-std=c++20' "$SRC/setup.py" || { echo "[install_mmcv] could not patch the C++ standard" >&2; exit 1; }
  export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if [ "$WITH_CUDA" = 1 ]; then export FORCE_CUDA=1; echo "[install_mmcv] CUDA found: building CUDA ops too"; fi
  # Show one line per compiled source so a 10-minute build visibly progresses.
  LOG="$WHEEL_DIR/build.log"
  ( cd "$SRC" && "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$WORK/dist" . ) 2>&1 \
    | tee "$LOG" | grep --line-buffered -oE '(\[[0-9]+/[0-9]+\] [A-Za-z/+]+ .{0,0}|Building wheel.*|Created wheel.*|error.*)' \
    | sed -u 's/^/[install_mmcv] /' || true
  ls "$WORK"/dist/mmcv-*.whl >/dev/null 2>&1 || { echo "[install_mmcv] build failed, see $LOG" >&2; exit 1; }
  cp "$WORK"/dist/mmcv-*.whl "$WHEEL_DIR"/
  # setuptools<70 was only for mmcv's setup.py; give torch back the setuptools it declares.
  "$PY" -m pip install -q "setuptools>=77,<81"  # <81: mmengine still imports pkg_resources
fi

echo "[install_mmcv] installing $(ls "$WHEEL_DIR"/mmcv-*.whl)"
"$PY" -m pip install -q "$WHEEL_DIR"/mmcv-*.whl
"$PY" -c "import mmcv, mmcv.ops; print('[install_mmcv] mmcv', mmcv.__version__, 'ops OK')"
