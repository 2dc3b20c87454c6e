#!/usr/bin/env bash
# EAGLE-3 draft for llama-3.3-70b-instruct on ShareGPT (target weights from the Hub or a local folder set in config.json).
#   bash recipes/llama-3.3-70b-instruct/run.sh [PROCS_PER_NODE] [extra specforge train flags, e.g. --resume]
# 8 GPUs = 2 ranks x 4 GPUs per target (config: target-gpus-per-rank 4); pass 2 per node.
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 bash recipes/llama-3.3-70b-instruct/run.sh 2
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC="${1:-2}"
shift || true
mkdir -p cache/data
if [ ! -s cache/data/sharegpt.jsonl ]; then
    specforge prepare-data sharegpt --output cache/data/sharegpt.jsonl
fi
if [ -n "${NNODES:-}" ]; then
    LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
            --master_port "${MASTER_PORT:-29500}")
else
    LAUNCH=(--standalone)
fi
exec torchrun "${LAUNCH[@]}" --nproc_per_node "$NPROC" -m specforge.cli train \
    --config recipes/llama-3.3-70b-instruct/config.json "$@"
