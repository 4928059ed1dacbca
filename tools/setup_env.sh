#!/usr/bin/env bash
# Create or refresh the project's virtual environment; idempotent (a second run takes seconds).
#   1. torch: keep one the user already has (in the venv, or in the base Python, which the venv then sees);
#      otherwise $TORCH_SPEC (default 'torch==2.14.1 torchvision==0.29.1': on PyPI the CUDA 13 build) from
#      $TORCH_INDEX_URL if set. A TORCH_SPEC given explicitly is installed even where a torch exists, e.g. for a
#      driver that needs another CUDA:
#        TORCH_SPEC='torch==2.14.1+cu126 torchvision==0.29.1+cu126' \
#        TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 make install
#   2. mmcv 2.1.0 built from source once and cached (tools/install_mmcv.sh: CUDA ops where torch's CUDA, a GPU
#      and a matching nvcc are there, or FORCE_CUDA=1; CPU ops otherwise, saying why).
#   3. mmdet 3.3.0, mmsegmentation 1.2.2, mmpretrain 1.2.0, the rest, and this package in editable mode, never
#      replacing torch.
#   4. detectron2 at a pinned commit, built from $DETECTRON2_SRC once and cached (tools/install_detectron2.sh),
#      with its dependencies from the registry under the same constraints.
# Usage: tools/setup_env.sh [PYTHON] [VENV]
set -euo pipefail
PYTHON=${1:-python3}
VENV=${2:-.venv}
cd "$(dirname "$0")/.."

DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
TORCH_INDEX=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_INDEX=(--index-url "$TORCH_INDEX_URL"); fi

if [ ! -x "$VENV/bin/python" ]; then
  if [ -z "${TORCH_SPEC:-}" ] && "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[setup_env] $PYTHON already has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'): keeping it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

if [ -n "${TORCH_SPEC:-}" ] || ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup_env] installing ${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
  # shellcheck disable=SC2086  # the spec is a list of requirements
  "${PIP[@]}" install -q "${TORCH_INDEX[@]}" ${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS="$VENV/convmae-constraints.txt"
# mmengine 0.10.x imports pkg_resources (gone from setuptools >= 81); torch 2.14 declares setuptools >= 77.
printf 'torch==%s\nsetuptools<81\n' "$TORCH_VERSION" > "$CONSTRAINTS"
if ! "$PY" -c "import torchvision" 2>/dev/null; then
  "${PIP[@]}" install -q -c "$CONSTRAINTS" torchvision
fi
echo "[setup_env] torch $TORCH_VERSION"

bash tools/install_mmcv.sh "$PY"

echo "[setup_env] installing mmdet, mmsegmentation, mmpretrain and convmae_backbone (editable)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" "setuptools>=77,<81" "mmengine==0.10.7" "mmdet==3.3.0" "mmsegmentation==1.2.2" \
  "mmpretrain==1.2.0" -e ".[tests]" 2>&1 | grep -v "^WARNING: Location" || true
bash tools/install_detectron2.sh "$PY" "$CONSTRAINTS"
"$PY" -W ignore -c "import pkg_resources, convmae_backbone, mmdet, mmseg, mmpretrain, mmcv.ops; print('[setup_env] ready: mmcv', \
mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__, 'mmpretrain', mmpretrain.__version__)"
