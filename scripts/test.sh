#!/usr/bin/env bash
# The test command: set up (scripts/setup_env.sh), run every test, then a short smoke of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CANDLE_VENV:-.venv}
ROOT=$(pwd)
cd python_tests
"$ROOT/$VENV/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "$ROOT/python_tests" "$@"
cd "$ROOT/benchmarks"
CANDLE_BENCH_SMOKE=1 "$ROOT/$VENV/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
  -c "$ROOT/pyproject.toml" "$ROOT/benchmarks" --benchmark-disable
