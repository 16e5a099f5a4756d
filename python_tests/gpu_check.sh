#!/usr/bin/env bash
# GPU check of candle-ext's CUDA kernels, for a machine with an NVIDIA GPU and the CUDA toolkit:
#   1. build the extension with its CUDA kernels (editable install, so the tests import the build),
#   2. launch every CUDA kernel variant once on small shapes and check each result (a script, seconds:
#      sign_pack/sign_ste layouts and vector widths, each conv path, tile shape and cp.async width, both conv
#      output layouts, the multi-res head forward and backward with split-K),
#   3. run the @pytest.mark.cuda tests of CANDLE_GPU_CHECK_TESTS (default: all of python_tests; the CUDA kernels'
#      own are python_tests/test_cuda_kernels.py, the rest adds the Triton JIT and model tests), then, unless
#      CANDLE_GPU_CHECK_TRITON=0, every test of python_tests/test_triton.py (most are not marked cuda: on a GPU
#      they run the compiled kernels on CUDA tensors),
#   4. run the compute-sanitizer tools of CANDLE_GPU_CHECK_SANITIZERS (default "memcheck racecheck synccheck",
#      slowest last; "" for none) over the script of step 2,
#   5. optionally (CANDLE_GPU_CHECK_BENCH=1) the CUDA benchmarks.
# A short GPU window: CANDLE_GPU_CHECK_TESTS=python_tests/test_cuda_kernels.py CANDLE_GPU_CHECK_SANITIZERS=memcheck.
# Logs: ${OUT:-./gpu_check_out}/{summary.txt,build.log,kernels.log,tests.log,triton.log,memcheck.log,
# racecheck.log,synccheck.log,bench.log}
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's arch), MAX_JOBS.
# Exit status 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=0
# Checked before anything is built: a misspelt tool would otherwise be found after the build and the tests.
read -r -a TOOLS <<<"${CANDLE_GPU_CHECK_SANITIZERS-memcheck racecheck synccheck}"
for t in "${TOOLS[@]}"; do
  case $t in memcheck | racecheck | synccheck) ;; *)
    echo "CANDLE_GPU_CHECK_SANITIZERS: unknown tool '$t' (memcheck, racecheck, synccheck)" | tee -a "$SUMMARY"
    exit 2 ;;
  esac
done

step() {  # step NAME LOG COMMAND...: run, log, record the exit status and the time taken
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  echo "== $name" | tee -a "$SUMMARY"
  "$@" >"$log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s (log: $(basename "$log"))" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "capability", torch.cuda.get_device_capability())'
} >>"$SUMMARY" 2>&1

ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
echo "TORCH_CUDA_ARCH_LIST=$ARCH" >>"$SUMMARY"
build() {
  TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --no-build-isolation --no-deps -v -e . &&
    "$PY" -c 'import candle_ext._C as m; assert m.with_cuda, "built without CUDA kernels"; print("with_cuda", m.with_cuda)'
}
if ! step "build (CUDA kernels for $ARCH)" "$OUT/build.log" build; then
  tail -n 40 "$OUT/build.log" >>"$SUMMARY"
  exit 1
fi

SCRIPT=$(mktemp --suffix=.py)
trap 'rm -f "$SCRIPT"' EXIT
cat >"$SCRIPT" <<'EOF'
"""Launch every CUDA kernel variant of candle_ext once on small shapes and check each result."""
import torch

import candle_ext._C as C
from candle_ext import reference as R

dev = "cuda"
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    for shape in ((2, 64, 8, 8), (2, 33, 5, 7)):  # vector and scalar variants
        x = torch.randn(shape, device=dev).to(dtype)
        b = torch.randn(shape[1], device=dev)
        g = torch.randn(shape, device=dev).to(dtype)
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(C.sign_pack_cuda(xx, b), R.sign_pack(x, b))
            assert torch.equal(C.sign_ste_cuda(xx, b), R.sign_ste(x, b))
            gx, gb = C.sign_ste_backward_cuda(g.contiguous(memory_format=torch.channels_last)
                                              if xx.is_contiguous(memory_format=torch.channels_last) else g, xx, b)
            # float32 math, one rounding to x's dtype: compare with the reference in float64
            want = R.sign_ste_backward(g.double(), x.double(), b.to(dtype).double())[0]
            torch.testing.assert_close(gx.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-5)
    y = torch.randn(3, 40, device=dev).to(dtype)
    C.sign_ste_backward_cuda(torch.randn_like(y), y, None)

# (n, cin, cout, size, k, stride, pad): 128x128, 128x64 and 64x64 tiles; 16-, 8- and 4-byte cp.async; k=5 popc.
convs = [(4, 128, 192, 30, 3, 1, 1), (2, 64, 64, 40, 3, 2, 1), (1, 96, 40, 9, 3, 1, 1), (1, 100, 24, 11, 1, 1, 0),
         (1, 40, 16, 9, 5, 1, 2), (2, 300, 70, 6, 3, 2, 1)]
for n, cin, cout, size, k, s, p in convs:
    xp = R.sign_pack(torch.randn(n, cin, size, size, device=dev))
    wp = R.sign_pack(torch.randn(cout, cin, k, k, device=dev))
    want = R.binary_conv2d_packed(xp, wp, cin, (s, s), (p, p), (1, 1))
    scale, shift = torch.rand(cout, device=dev), torch.randn(cout, device=dev)
    for path in (0, 2):
        assert torch.equal(C.binary_conv2d_cuda_path(xp, wp, cin, s, s, p, p, 1, 1, None, None, C.OutKind.int32, False, C.ConvPath(path)), want)
        for kind, cl in ((1, True), (2, False), (3, True)):
            C.binary_conv2d_cuda_path(xp, wp, cin, s, s, p, p, 1, 1, scale, shift, C.OutKind(kind), cl, C.ConvPath(path))
    print("conv", (n, cin, cout, size, k, s, p), C.binary_conv2d_cuda_plan(xp, wp, cin, s, s, p, p, 1, 1, C.ConvPath.auto))

for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # the last one has few output tiles and many K slices: split-K partial sums and their reduction
    for n, ct, cs, sizes in ((2, 96, 40, [(4, 4), (7, 7), (15, 15)]), (1, 300, 136, [(3, 5), (6, 6), (14, 2)]),
                             (8, 64, 40, [(8, 8), (14, 14), (28, 28)])):
        feats = [torch.randn(n, ct, h, w, device=dev).to(dtype) for h, w in sizes]
        weights = [(torch.randn(cs, ct, device=dev) / ct ** 0.5).to(dtype) for _ in sizes]
        biases = [torch.randn(cs, device=dev).to(dtype) for _ in sizes]
        out = C.multires_head_cuda(feats, weights, biases, 1)
        want = R.multires_head([f.double() for f in feats], [w.double() for w in weights],
                               [b.double() for b in biases], 1)
        torch.testing.assert_close(out.double(), want, rtol=5e-2, atol=5e-2)
        C.multires_head_backward_cuda(torch.randn_like(out), feats, weights, 1, True)
torch.cuda.synchronize()
print("all kernels ran")
EOF

step "every kernel variant once" "$OUT/kernels.log" "$PY" "$SCRIPT"
tail -n 3 "$OUT/kernels.log" >>"$SUMMARY"

read -r -a TESTS <<<"${CANDLE_GPU_CHECK_TESTS:-python_tests}"
step "pytest -m cuda ${TESTS[*]}" "$OUT/tests.log" \
  "$PY" -m pytest "${TESTS[@]}" -m cuda -q -rs -p no:cacheprovider --durations=15
tail -n 5 "$OUT/tests.log" >>"$SUMMARY"
if [ "${CANDLE_GPU_CHECK_TRITON:-1}" != "0" ]; then
  step "pytest python_tests/test_triton.py (compiled kernels)" "$OUT/triton.log" \
    "$PY" -m pytest python_tests/test_triton.py -q -rs -p no:cacheprovider --durations=10
  tail -n 5 "$OUT/triton.log" >>"$SUMMARY"
fi

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ "${#TOOLS[@]}" -eq 0 ]; then
  echo "== sanitizers: none asked for (CANDLE_GPU_CHECK_SANITIZERS is empty)" | tee -a "$SUMMARY"
elif [ -z "$SAN" ]; then
  echo "== compute-sanitizer not found: sanitizer steps skipped" | tee -a "$SUMMARY"
  failed=1
else
  # No caching allocator: memcheck then sees every tensor's real bounds.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for t in "${TOOLS[@]}"; do
    case $t in
      memcheck) opts=() ;;
      # racecheck and synccheck instrument only candle-ext's kernels (namespace candle in the mangled names).
      racecheck) opts=(--racecheck-report all --kernel-name kns=candle) ;;
      synccheck) opts=(--kernel-name kns=candle) ;;
    esac
    step "compute-sanitizer $t" "$OUT/$t.log" \
      "$SAN" --tool "$t" "${opts[@]}" --error-exitcode 99 --print-limit 50 "$PY" "$SCRIPT"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|all kernels ran" "$OUT/$t.log" | sed "s/^/   $t: /" >>"$SUMMARY"
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

if [ "${CANDLE_GPU_CHECK_BENCH:-0}" = "1" ]; then
  step "benchmarks/test_bench_cuda.py" "$OUT/bench.log" \
    "$PY" -m pytest benchmarks/test_bench_cuda.py -q -s -p no:cacheprovider --benchmark-disable
fi

echo "== overall: $([ $failed -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$SUMMARY"
exit $failed
