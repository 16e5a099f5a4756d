#!/usr/bin/env bash
# The test command: set up (scripts/setup_env.sh), run every test, then a short smoke of the benchmarks
# (CANDLE_BENCH_SMOKE=1: small shapes, timing disabled; run `pytest benchmarks/ -s` yourself to measure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CANDLE_VENV:-.venv}
# On CI the aarch64 NEON test must run, not skip (setup_env.sh installed its cross compiler and qemu).
if [ "${CI:-}" = "true" ]; then
  export CANDLE_EXT_REQUIRE_CROSS=${CANDLE_EXT_REQUIRE_CROSS:-1}
fi
"$VENV/bin/python" -m pytest -q python_tests "$@"
CANDLE_BENCH_SMOKE=1 "$VENV/bin/python" -m pytest -q benchmarks --benchmark-disable
