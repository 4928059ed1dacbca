#!/usr/bin/env bash
# Build (once) and install mmcv 2.1.0 with its compiled ops into the given Python environment.
#
# mmcv publishes no wheels for current torch, so we build its source distribution. Two patches are
# needed on a current stack: torch >= 2.13 headers require C++20 (mmcv hard-codes -std=c++17), and its
# setup.py imports pkg_resources (setuptools < 70). The built wheel is cached per torch/CUDA build in
# $CONVMAE_CACHE (default ~/.cache/convmae_backbone) so later runs install it in seconds.
#
# CUDA ops are built only where they can be: torch is a CUDA build, it sees a GPU, and the nvcc found (CUDA_HOME,
# then PATH, then /usr/local/cuda: the order torch's extension builder uses) has torch's CUDA major version; or
# when FORCE_CUDA=1 asks for them. Otherwise CPU ops, with one line saying why and how to get CUDA ops.
#
# Usage: tools/install_mmcv.sh [--dry-run] [PYTHON]   (default: .venv/bin/python)
#   --dry-run: print the decision (CUDA or CPU ops, why) and the wheel cache folder; build nothing.
# Sourced (`source tools/install_mmcv.sh`), it only defines its functions (tests call cuda_ops_decision).
set -euo pipefail

MMCV_VERSION=2.1.0
CACHE=${CONVMAE_CACHE:-$HOME/.cache/convmae_backbone}

log() { echo "[install_mmcv] $*" >&2; }

# The nvcc a CUDA build would use: $CUDA_HOME/bin/nvcc, else nvcc on PATH, else the default toolkit's
# ($CONVMAE_DEFAULT_CUDA, default /usr/local/cuda).
find_nvcc() {
  local default=${CONVMAE_DEFAULT_CUDA:-/usr/local/cuda}
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  if [ -x "$default/bin/nvcc" ]; then echo "$default/bin/nvcc"; fi
}

# "12.4" from `nvcc --version` ("Cuda compilation tools, release 12.4, V12.4.131"); empty if unreadable.
nvcc_cuda_version() {
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# cuda_ops_decision TORCH_CUDA GPU_VISIBLE: print "cuda" or "cpu" on stdout and, on stderr, one line saying why
# (and how to get CUDA ops where they are not built). TORCH_CUDA: torch.version.cuda ("" for a CPU build);
# GPU_VISIBLE: 1 if torch.cuda.is_available().
cuda_ops_decision() {
  local torch_cuda=$1 gpu=$2 nvcc version
  local how="for CUDA ops install the CUDA ${torch_cuda:-matching} toolkit and set CUDA_HOME to it, or set FORCE_CUDA=1"
  nvcc=$(find_nvcc)
  version=$([ -n "$nvcc" ] && nvcc_cuda_version "$nvcc" || true)
  if [ -z "$torch_cuda" ] || [ "$torch_cuda" = None ]; then
    log "CPU ops: torch is a CPU build (for CUDA ops install a CUDA build of torch: TORCH_SPEC / TORCH_INDEX_URL" \
        "of tools/setup_env.sh)"
    echo cpu; return
  fi
  if [ "${FORCE_CUDA:-0}" = 1 ]; then
    if [ -z "$nvcc" ]; then
      log "FORCE_CUDA=1 but no nvcc found (CUDA_HOME, PATH, /usr/local/cuda): set CUDA_HOME to a CUDA toolkit"
      return 1
    fi
    log "CUDA ops: FORCE_CUDA=1 ($nvcc is CUDA ${version:-unknown}, torch was built with CUDA $torch_cuda)"
    echo cuda; return
  fi
  if [ "$gpu" != 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      log "WARNING: torch was built with CUDA $torch_cuda but sees no GPU although an NVIDIA driver is installed:" \
          "the driver is probably too old for CUDA $torch_cuda (nvidia-smi shows the newest CUDA it supports)." \
          "Install a torch build for it, e.g. TORCH_SPEC='torch==2.14.1+cu126 torchvision==0.29.1+cu126'" \
          "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 make install"
    fi
    log "CPU ops: torch (CUDA $torch_cuda) sees no GPU; FORCE_CUDA=1 builds CUDA ops anyway"
    echo cpu; return
  fi
  if [ -z "$nvcc" ]; then
    log "CPU ops: no nvcc found (CUDA_HOME, PATH, /usr/local/cuda); $how"
    echo cpu; return
  fi
  if [ "${version%%.*}" != "${torch_cuda%%.*}" ]; then
    log "CPU ops: $nvcc is CUDA ${version:-unknown} but torch was built with CUDA $torch_cuda (the major versions" \
        "must match); $how"
    echo cpu; return
  fi
  log "CUDA ops: $nvcc is CUDA $version, torch was built with CUDA $torch_cuda"
  echo cuda
}

# wheel_tag TORCH_VERSION TORCH_CUDA OPS: the cache key of a compiled wheel ("2.14.1_cu130-cpu"), naming the torch
# build and whether CUDA ops are compiled, so that a wheel is only reused where it is ABI compatible.
wheel_tag() {
  local tag=${1//+/_}
  if [ "$3" = cuda ]; then echo "$tag-cu${2//./}"; else echo "$tag-cpu"; fi
}

main() {
  local dry_run=0
  if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
  PY=$(command -v "${1:-.venv/bin/python}") || { log "no python at ${1:-.venv/bin/python}"; exit 1; }
  PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")

  local torch_version torch_cuda gpu
  read -r torch_version torch_cuda gpu < <("$PY" -c \
    'import torch; print(torch.__version__, torch.version.cuda or "None", int(torch.cuda.is_available()))')
  local ops
  ops=$(cuda_ops_decision "$torch_cuda" "$gpu")
  if [ "$ops" = cuda ]; then  # the toolkit of the nvcc that was checked builds the ops
    CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(find_nvcc)")")}
    export CUDA_HOME
  fi
  WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-torch$(wheel_tag "$torch_version" "$torch_cuda" "$ops")"
  if [ "$dry_run" = 1 ]; then
    echo "ops=$ops wheel_dir=$WHEEL_DIR"
    return 0
  fi

  if "$PY" - <<PYEOF 2>/dev/null; then
import mmcv, mmcv.ops  # noqa: F401  (mmcv.ops fails without the compiled extension)
assert mmcv.__version__ == "$MMCV_VERSION"
PYEOF
    log "mmcv $MMCV_VERSION with ops already installed"
    return 0
  fi
  mkdir -p "$WHEEL_DIR"

  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    log "no cached wheel in $WHEEL_DIR: building mmcv $MMCV_VERSION from source (~10 min on 2 cores)"
    "$PY" -m pip install -q "setuptools<70" wheel ninja packaging
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary mmcv --no-build-isolation -d "$WORK" "mmcv==$MMCV_VERSION"
    tar -xzf "$WORK"/mmcv-$MMCV_VERSION.tar.gz -C "$WORK"
    SRC="$WORK/mmcv-$MMCV_VERSION"
    sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
    grep -q -- '-std=c++20' "$SRC/setup.py" || { log "could not patch the C++ standard"; exit 1; }
    export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # mmcv's setup.py builds CUDA ops when torch sees a GPU or FORCE_CUDA=1: make it follow our decision.
    if [ "$ops" = cuda ]; then export FORCE_CUDA=1; else export FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=""; fi
    # Show one line per compiled source so a 10-minute build visibly progresses.
    LOG="$WHEEL_DIR/build.log"
    ( cd "$SRC" && "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$WORK/dist" . ) 2>&1 \
      | tee "$LOG" | grep --line-buffered -oE '(\[[0-9]+/[0-9]+\] [A-Za-z/+]+ .{0,0}|Building wheel.*|Created wheel.*|error.*)' \
      | sed -u 's/^/[install_mmcv] /' || true
    ls "$WORK"/dist/mmcv-*.whl >/dev/null 2>&1 || { log "build failed, see $LOG"; exit 1; }
    cp "$WORK"/dist/mmcv-*.whl "$WHEEL_DIR"/
    # setuptools<70 was only for mmcv's setup.py; give torch back the setuptools it declares.
    "$PY" -m pip install -q "setuptools>=77,<81"  # <81: mmengine still imports pkg_resources
  fi

  log "installing $(ls "$WHEEL_DIR"/mmcv-*.whl)"
  "$PY" -m pip install -q "$WHEEL_DIR"/mmcv-*.whl
  "$PY" -c "import mmcv, mmcv.ops; print('[install_mmcv] mmcv', mmcv.__version__, 'ops OK')"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
