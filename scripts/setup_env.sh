#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with the pinned requirements, the
# offline Fashion-MNIST package (Debian), and candle-ext built and installed (C++ always; CUDA kernels when the
# CUDA toolkit is present). Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${CANDLE_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing requirements"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt

# Offline data for the demo: Fashion-MNIST from Debian (the demo downloads it instead when online).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing dataset-fashion-mnist (Debian)"
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) ||
    echo "   (could not install dataset-fashion-mnist; the demo will try a download instead)"
fi

# The aarch64 kernel tests (python_tests/test_cross_isa.py): a cross compiler and a user-mode emulator, both
# Debian. Without them that test skips (on CI, where scripts/test.sh requires it, it fails).
if ! { command -v aarch64-linux-gnu-g++ && { command -v qemu-aarch64 || command -v qemu-aarch64-static; }; } \
     >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing g++-aarch64-linux-gnu and qemu-user (Debian; aarch64 kernels tested under emulation)"
  CROSS_PKGS="g++-aarch64-linux-gnu qemu-user"
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $CROSS_PKGS >/dev/null 2>&1 ||
     (apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $CROSS_PKGS >/dev/null)) ||
    echo "   (could not install them; the aarch64 test in python_tests/test_cross_isa.py will skip)"
fi

# The AVX-512 kernel tests without AVX-512 hardware (python_tests/test_cross_isa.py): SIMDe's header-only
# implementations of the AVX-512 intrinsics (Debian libsimde-dev). Without it that test skips (on CI it fails).
if [ "$(uname -m)" = x86_64 ] && [ ! -f /usr/include/simde/x86/avx512.h ] && command -v apt-get >/dev/null 2>&1 \
     && [ "$(id -u)" = 0 ]; then
  echo "== installing libsimde-dev (Debian; the AVX-512 kernels tested under SIMDe emulation)"
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libsimde-dev >/dev/null 2>&1 ||
     (apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libsimde-dev >/dev/null)) ||
    echo "   (could not install it; the AVX-512 emulation test in python_tests/test_cross_isa.py will skip)"
fi

# CI compiles the CUDA sources for Hopper only, to save time; users get the full default list.
if [ "${CI:-}" = "true" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST=9.0
fi
# Rebuild only when what the build reads changed (sources, setup.py, torch, the build's environment): a second
# `scripts/demo.sh` or `scripts/test.sh` starts at once instead of compiling the CUDA kernels again.
STAMP="$VENV/.candle_ext_build"
SIG=$( { cat setup.py; find csrc -type f | LC_ALL=C sort | xargs cat; "$VENV/bin/python" -c "import torch; print(torch.__version__)";
         echo "${TORCH_CUDA_ARCH_LIST:-} ${CANDLE_EXT_NO_CUDA:-} $(command -v nvcc || true)"; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SIG" ] && "$VENV/bin/python" -c "import candle_ext._C" 2>/dev/null; then
  echo "== candle-ext is already built from these sources (delete $STAMP to force a rebuild)"
else
  echo "== building and installing candle-ext (this compiles C++/CUDA; a few minutes the first time)"
  rm -f "$STAMP"
  # Editable: the compiled module lands in ./candle_ext too, so `import candle_ext` from this checkout gets it.
  "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$SIG" > "$STAMP"
fi
"$VENV/bin/python" -m candle_ext.info
