#!/usr/bin/env bash
# One of this checkout's tools under torchrun, GPUS processes per node (what dist_train.sh, dist_test.sh and
# dist_pretrain.sh call):  bash tools/torchrun.sh GPUS TOOL.py [ARGS...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node. PYTHON selects the interpreter.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 GPUS TOOL.py [ARGS...]" >&2
    exit 2
fi
GPUS=$1
TOOL=$2
shift 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$GPUS" --master_port="${PORT:-29500}" \
    "$ROOT/tools/$TOOL" "$@"
