#!/usr/bin/env bash
# Build (once) and install detectron2 at a pinned upstream commit into the given Python environment, with its
# dependencies from the registry (the detectron2 face of this package, `convmae_backbone.detectron2`).
#
# detectron2 has no registry release after v0.6 (2021), which no longer imports on Pillow >= 10 / NumPy >= 1.24,
# so it is built from source as its install guide says (`pip wheel --no-build-isolation`): from $DETECTRON2_SRC,
# by default upstream's git URL at the pinned commit (CI points it at the archive of that commit in
# ../shared/vendor/). The wheel is cached per torch build and ops kind in $CONVMAE_CACHE (default
# ~/.cache/convmae_backbone), so later runs install it in seconds. CUDA ops are built where mmcv's are
# (tools/install_mmcv.sh: cuda_ops_decision).
#
# Usage: tools/install_detectron2.sh [--dry-run] [PYTHON] [CONSTRAINTS]   (default: .venv/bin/python, no constraints)
#   --dry-run: print the source and the wheel cache folder; build nothing.
set -euo pipefail

DETECTRON2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
DETECTRON2_SRC=${DETECTRON2_SRC:-git+https://github.com/facebookresearch/detectron2.git@$DETECTRON2_COMMIT}
CACHE=${CONVMAE_CACHE:-$HOME/.cache/convmae_backbone}
# detectron2's runtime dependencies, as its setup.py pins them (fvcore/iopath/omegaconf upper bounds).
DEPENDENCIES=("fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "omegaconf>=2.1,<2.4" "hydra-core>=1.1" \
  "pycocotools>=2.0.2" "yacs>=0.1.8" tabulate cloudpickle "termcolor>=1.1" "tqdm>4.29.0" matplotlib pyyaml \
  tensorboard black packaging)

# shellcheck source=tools/install_mmcv.sh
source "$(dirname "${BASH_SOURCE[0]}")/install_mmcv.sh"  # defines cuda_ops_decision, find_nvcc, wheel_tag
log() { echo "[install_detectron2] $*" >&2; }

main() {
  local dry_run=0
  if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
  PY=$(command -v "${1:-.venv/bin/python}") || { log "no python at ${1:-.venv/bin/python}"; exit 1; }
  PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
  local constraints=()
  if [ -n "${2:-}" ]; then constraints=(-c "$2"); fi

  local torch_version torch_cuda gpu ops
  read -r torch_version torch_cuda gpu < <("$PY" -c \
    'import torch; print(torch.__version__, torch.version.cuda or "None", int(torch.cuda.is_available()))')
  ops=$(cuda_ops_decision "$torch_cuda" "$gpu")
  WHEEL_DIR="$CACHE/detectron2-${DETECTRON2_COMMIT:0:7}-torch$(wheel_tag "$torch_version" "$torch_cuda" "$ops")"
  if [ "$dry_run" = 1 ]; then
    echo "src=$DETECTRON2_SRC ops=$ops wheel_dir=$WHEEL_DIR"
    return 0
  fi

  # SimpleFeaturePyramid (detectron2.modeling.backbone.vit) is newer than any registry release.
  if "$PY" -W ignore -c 'import detectron2._C, detectron2.modeling.backbone.vit' 2>/dev/null; then
    log "detectron2 with ops already installed"
  else
    if ! ls "$WHEEL_DIR"/detectron2-*.whl >/dev/null 2>&1; then
      log "no cached wheel in $WHEEL_DIR: building detectron2 from $DETECTRON2_SRC (~3 min on 2 cores)"
      mkdir -p "$WHEEL_DIR"
      WORK=$(mktemp -d)
      trap 'rm -rf "$WORK"' EXIT
      if [ "$ops" = cuda ]; then
        CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(find_nvcc)")")}
        export CUDA_HOME FORCE_CUDA=1
      else
        export FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=""
      fi
      MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" \
        "$DETECTRON2_SRC" > "$WHEEL_DIR/build.log" 2>&1 || { log "build failed, see $WHEEL_DIR/build.log"; exit 1; }
      cp "$WORK"/dist/detectron2-*.whl "$WHEEL_DIR"/
    fi
    log "installing $(ls "$WHEEL_DIR"/detectron2-*.whl)"
    "$PY" -m pip install -q --no-deps "$WHEEL_DIR"/detectron2-*.whl
  fi
  "$PY" -m pip install -q "${constraints[@]}" "${DEPENDENCIES[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -W ignore -c "import detectron2, detectron2._C, fvcore, pycocotools; \
print('[install_detectron2] detectron2', detectron2.__version__, '(${DETECTRON2_COMMIT:0:7}) ops OK')"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
