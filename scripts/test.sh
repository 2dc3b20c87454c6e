#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (pytest's "no tests collected" counts as a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
set +e
python3 -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
