#!/usr/bin/env bash
# Manual check (not run by the tests: it downloads the ~450 MB aarch64 torch wheel): cross-compile the whole
# extension (csrc/bindings.cpp + csrc/cpu/*.cpp, the CPU build `pip install .` makes on an aarch64 board) with
# g++-aarch64-linux-gnu and the flags setup.py uses, link it against the aarch64 wheel's libraries of the torch
# version installed here, and check that every symbol it needs, except Python's, is defined by them or by the
# C/C++ runtime. It proves the build compiles (with -Wall, warnings shown) and links for aarch64; it does not
# run it (that needs an aarch64 Python).
#   bash python_tests/cross/build_extension_aarch64.sh [WORKDIR]   (default /tmp/candle-aarch64-build)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
WORK=${1:-/tmp/candle-aarch64-build}
CXX=aarch64-linux-gnu-g++
NM=aarch64-linux-gnu-nm
SYSROOT=/usr/aarch64-linux-gnu/lib
command -v $CXX >/dev/null || { echo "needs $CXX (apt-get install g++-aarch64-linux-gnu)"; exit 1; }

TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')  # arch-neutral on LP64 Linux
mkdir -p "$WORK/obj"
if [ ! -d "$WORK/torch/lib" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version "$PYVER" --implementation cp "torch==$TORCH_VERSION" -d "$WORK/wheel"
  unzip -q -o "$WORK"/wheel/torch-*.whl 'torch/lib/*.so*' 'torch/include/*' -d "$WORK"
fi
T="$WORK/torch"

objs=()
for src in csrc/bindings.cpp csrc/cpu/*.cpp; do
  obj="$WORK/obj/$(basename "$src" .cpp).o"
  $CXX -DNDEBUG -fwrapv -O3 -Wall -fPIC -fopenmp -std=c++20 -DTORCH_API_INCLUDE_EXTENSION_H \
    -DTORCH_EXTENSION_NAME=_C -Icsrc -I"$T/include" -I"$T/include/torch/csrc/api/include" -I"$PYINC" \
    -c "$src" -o "$obj"
  objs+=("$obj")
done
so="$WORK/_C.cpython-$PYVER-aarch64-linux-gnu.so"
$CXX -shared "${objs[@]}" -L"$T/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -fopenmp -o "$so"

$NM -D --undefined-only "$so" | awk '{print $2}' | sed 's/@.*//' | sort -u > "$WORK/undefined.txt"
for lib in "$T"/lib/*.so* "$SYSROOT"/libstdc++.so.6 "$SYSROOT"/libc.so.6 "$SYSROOT"/libm.so.6 "$SYSROOT"/libgcc_s.so.1; do
  $NM -D --defined-only "$lib" 2>/dev/null | awk '{print $3}' | sed 's/@.*//'
done | sort -u > "$WORK/defined.txt"
# Python's symbols come from the interpreter at load time; _ITM_* and __gmon_start__ are weak.
missing=$(comm -23 "$WORK/undefined.txt" "$WORK/defined.txt" | grep -v -E '^_?Py|^_Py|^_ITM_|^__gmon_start__$' || true)
if [ -n "$missing" ]; then
  echo "unresolved symbols:"; echo "$missing"; exit 1
fi
echo "OK: $so ($(file -b "$so" | cut -d, -f1-2)) compiles and links against torch $TORCH_VERSION for aarch64;"
echo "    $(wc -l < "$WORK/undefined.txt") undefined symbols, all in torch, the C/C++ runtime or Python"
