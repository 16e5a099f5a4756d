#!/usr/bin/env bash
# The main job: set up (scripts/setup_env.sh), then run the CANDLE demo on the offline default
# (Fashion-MNIST-LT, EfficientNet-Lite0 teacher, binary ReActNet-A student). Extra arguments go to `candle demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CANDLE_VENV:-.venv}
exec "$VENV/bin/candle" demo "$@"
