#!/usr/bin/env bash
# Distributed evaluation with torchrun: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py ARGS]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT (tools/torchrun.sh). PYTHON selects the interpreter.
set -euo pipefail
exec bash "$(dirname "$0")/torchrun.sh" "${3:?usage: $0 CONFIG CHECKPOINT GPUS [ARGS...]}" test.py "$1" "$2" \
    --launcher pytorch "${@:4}"
