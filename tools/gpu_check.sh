#!/usr/bin/env bash
# What a CUDA machine adds to `make test`, in one go (meant to finish in under 10 minutes once mmcv's wheel is
# cached; a first CUDA build of mmcv's ops takes longer on few cores):
#   1. the install (`make install`: torch, mmcv with CUDA ops where tools/install_mmcv.sh decides so, the rest);
#   2. the tests marked `cuda` (pytest -m cuda; they are skipped without a GPU, and a skipped one is reported);
#   3. the benchmark's GPU rows (tools/benchmark.py --device cuda --only pretrain), whose tables are printed in the
#      format of docs/benchmark.md and written to $OUT/gpu_bench.json.
# Usage: tools/gpu_check.sh [OUT]   (default: gpu_check_output); ITERS / WARMUP (5 / 3) size the benchmark.
# Exit status: non-zero when no GPU is usable, a step fails, or a CUDA test did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_output}
mkdir -p "$OUT"
PY=${VENV:-.venv}/bin/python
START=$SECONDS
step() { echo; echo "[gpu_check] $* (at $((SECONDS - START)) s)"; }

step "machine"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "[gpu_check] no NVIDIA driver (nvidia-smi not found): nothing to check on this machine" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step "install"
make install
bash tools/install_mmcv.sh --dry-run "$PY"
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU'
print(f'[gpu_check] torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, '
      f'bf16: {torch.cuda.is_bf16_supported()}')
PYEOF

step "tests marked cuda"
"$PY" -m pytest -q -m cuda -rs tests 2>&1 | tee "$OUT/cuda_tests.txt"
if grep '^SKIPPED' "$OUT/cuda_tests.txt" | grep -qv 'mmcv was built with CPU ops only'; then
  echo "[gpu_check] a CUDA test was skipped (listed above)" >&2
  exit 1
fi

step "benchmark, GPU rows"
PYTHONPATH=. "$PY" tools/benchmark.py --device cuda --only pretrain --iters "${ITERS:-5}" \
  --warmup "${WARMUP:-3}" --json "$OUT/gpu_bench.json" | tee "$OUT/gpu_bench.md"

step "done: $OUT/cuda_tests.txt, $OUT/gpu_bench.md, $OUT/gpu_bench.json"
