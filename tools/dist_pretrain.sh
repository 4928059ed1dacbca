#!/usr/bin/env bash
# Distributed ConvMAE pretraining with torchrun: bash tools/dist_pretrain.sh CONFIG GPUS [tools/pretrain.py ARGS]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT (tools/torchrun.sh). PYTHON selects the interpreter.
set -euo pipefail
exec bash "$(dirname "$0")/torchrun.sh" "${2:?usage: $0 CONFIG GPUS [ARGS...]}" pretrain.py "$1" --launcher pytorch \
    "${@:3}"
