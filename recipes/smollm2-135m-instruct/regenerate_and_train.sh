#!/usr/bin/env bash
# Regenerate the ShareGPT prompts' answers with the target itself (one specserve per GPU, greedy), then train the
# draft on the target's own answers, which is what it has to predict when serving.
#   bash recipes/smollm2-135m-instruct/regenerate_and_train.sh [NUM_GPUS] [extra `specforge train` flags]
# Environment: NUM_CONVERSATIONS (default 6000), MAX_TURNS (1), MAX_TOKENS (512), REGEN_SECONDS (stop regenerating
# after this long and train on what is done; the run resumes where it stopped), DATA (source JSONL), TRAIN=0 (stop
# after regenerating).
set -euo pipefail
cd "$(dirname "$0")/../.."
NUM_GPUS="${1:-1}"
shift || true
DATA="${DATA:-cache/data/sharegpt.jsonl}"
REGEN="${REGEN:-cache/data/sharegpt_regenerated_smollm2.jsonl}"
mkdir -p "$(dirname "$DATA")" "$(dirname "$REGEN")"
[ -s "$DATA" ] || python3 -m specforge.cli prepare-data sharegpt --output "$DATA"
# Convert the target once before several servers would race to cache it.
python3 -c "from serving.models.loader import resolve_model_path; resolve_model_path(None)"

PIDS=()
URLS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
for ((g = 0; g < NUM_GPUS; g++)); do
    port=$((31000 + g))
    # Batches up to 256 decode in CUDA graphs; big prefill chunks keep prefill steps few between decode runs.
    CUDA_VISIBLE_DEVICES=$g python3 -m serving.cli --port "$port" --max-running-requests 256 --cuda-graph-max-bs 256 \
        --chunked-prefill-size 8192 --log-level warning &
    PIDS+=($!)
    URLS+=(--server-url "http://127.0.0.1:$port")
done
for ((g = 0; g < NUM_GPUS; g++)); do
    for _ in $(seq 300); do
        python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:$((31000 + g))/health" 2>/dev/null && break
        sleep 1
    done
done
timeout "${REGEN_SECONDS:-0}" python3 -m specforge.cli regenerate --input "$DATA" --output "$REGEN" "${URLS[@]}" \
    --concurrency 256 --max-tokens "${MAX_TOKENS:-512}" --max-turns "${MAX_TURNS:-1}" \
    --limit "${NUM_CONVERSATIONS:-6000}" || [ $? = 124 ]
kill "${PIDS[@]}"
wait "${PIDS[@]}" 2>/dev/null || true
[ "${TRAIN:-1}" = 1 ] || exit 0

torchrun --standalone --nproc_per_node "$NUM_GPUS" -m specforge.cli train \
    --config recipes/smollm2-135m-instruct/config.json --train-data-path "$REGEN" \
    --output-dir outputs/smollm2-135m-instruct-eagle3-regenerated "$@"
