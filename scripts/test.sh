#!/usr/bin/env bash
# Install the project with its test extras (CPU torch from the local wheel cache, never a CUDA build) and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 triton==3.6.0
python3 -m pip install -q -e ".[test,data]"
set +e
python3 -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
