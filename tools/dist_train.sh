#!/usr/bin/env bash
# Distributed training with torchrun: bash tools/dist_train.sh CONFIG GPUS [tools/train.py ARGS]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT (tools/torchrun.sh). PYTHON selects the interpreter.
set -euo pipefail
exec bash "$(dirname "$0")/torchrun.sh" "${2:?usage: $0 CONFIG GPUS [ARGS...]}" train.py "$1" --launcher pytorch \
    "${@:3}"
