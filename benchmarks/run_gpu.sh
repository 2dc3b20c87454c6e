#!/usr/bin/env bash
# Every GPU table of docs/benchmarks.md in one command (one H200: 415 s in session 7, warm-up since grown):
#   bash benchmarks/run_gpu.sh [OUT_DIR]        (default: bench_out/)
# Kernels at Llama-3.1-8B shapes, the SmolLM2 engine (decode speed, greedy agreement with the torch path,
# transformers baseline), Llama-3.1-8B-shape step costs, and speculative serving with the bundled draft over the 80
# MT-Bench questions (adaptive default at batch 1/4/16/64, three alternating runs per system; forced chain 3/1/4 and
# tree 6/8/32 for accept lengths).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_out}"
mkdir -p "$OUT"
START=$(date +%s)
status=0
step() {
    local name=$1
    shift
    local t0=$(date +%s)
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1 || { echo "!! $name failed (see $OUT/$name.log)"; status=1; }
    echo "   $name: $(( $(date +%s) - t0 )) s"
}
step kernels python3 benchmarks/bench_kernels.py --out "$OUT/h200_kernels.json"
step engine python3 benchmarks/bench_gpu.py --out "$OUT/h200_engine.json"
step speculative python3 -m serving.cli bench --speculative --batch-sizes 1,4,16,64 --num-prompts 80 \
    --max-tokens 128 --repeats 3 --out "$OUT/h200_speculative.json" --plot-dir "$OUT" --quiet
step chain python3 -m serving.cli bench --speculative --disable-speculative-adaptive --always-speculate \
    --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4 --batch-sizes 1,16 \
    --num-prompts 80 --max-tokens 128 --out "$OUT/h200_accept_chain.json" --quiet
step tree python3 -m serving.cli bench --speculative --disable-speculative-adaptive --always-speculate \
    --speculative-num-steps 6 --speculative-eagle-topk 8 --speculative-num-draft-tokens 32 --batch-sizes 1,16 \
    --num-prompts 80 --max-tokens 128 --out "$OUT/h200_accept_tree.json" --quiet
python3 benchmarks/gpu_summary.py "$OUT"
echo "total: $(( $(date +%s) - START )) s"
exit $status
