// Pieces shared by the CUDA kernels of csrc/cuda/*.cu, included once per file (everything has internal linkage).
//
// Device part (CUDA's own headers only, compiled in every nvcc pass): FastDiv, the PTX wrappers (ldmatrix,
// cp.async, mma.sync) and the element types of the sign kernels. Host part (#ifndef __CUDA_ARCH__, compiled in
// the host pass alone so the per-GPU-target passes do not parse torch's headers): the torch includes, index
// limits, dtype/layout checks and launch helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// Device passes below sm_80 have no cp.async or the mma.sync shapes used here (1-bit AND-popc, m16n8k16,
// TF32): there the wrappers below are empty and every kernel that uses them is compiled to __trap()
// (CANDLE_MMA_TRAP), never to an empty body that an sm_80+ GPU could JIT from compute_7x PTX and run
// "successfully". The host side never launches them from such code either (kernel_ptx_arch below).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define CANDLE_MMA_ENABLED 1
#elif defined(__CUDA_ARCH__)
#define CANDLE_MMA_TRAP 1
#endif

namespace candle {
namespace {

// n / d and n % d for 0 <= n < 2^31 by a multiply and a shift (d fixed per launch, set up on the host).
struct FastDiv {
  uint32_t d, m, s;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor), m(0), s(0) {
    while (s < 31 && (1u << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
  __device__ __forceinline__ uint32_t mod(uint32_t n) const { return n - div(n) * d; }
};

// ---------------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

// Four 8x8 matrices of 16-bit elements from shared memory, one fragment register each (.trans: transposed).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#ifdef CANDLE_MMA_ENABLED
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#ifdef CANDLE_MMA_ENABLED
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

// BYTES (16, 8 or 4) from global to shared memory, asynchronously; zero-filled instead when !valid.
template <int BYTES>
__device__ __forceinline__ void cp_async_zfill(void* smem, const void* gmem, bool valid) {
#ifdef CANDLE_MMA_ENABLED
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? BYTES : 0;  // 0: nothing is read, the destination is zero-filled
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gmem), "n"(BYTES),
                 "r"(src_size));
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef CANDLE_MMA_ENABLED
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CANDLE_MMA_ENABLED
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// d += popc(A & B) for a 16x256 (rows) by 256x8 (columns) bit tile.
__device__ __forceinline__ void mma_b1_and(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef CANDLE_MMA_ENABLED
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += A x B, m16n8k16, float16 or bfloat16 (T) operands, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef CANDLE_MMA_ENABLED
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// d += A x B, m16n8k8, TF32 operands (to_tf32), float32 accumulators.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef CANDLE_MMA_ENABLED
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ uint32_t to_tf32(float f) {
  uint32_t r = 0;
#ifdef CANDLE_MMA_ENABLED
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
#endif
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// Element types of the sign kernels (sign_pack.cu, sign_ste.cu).

// Element types as CUDA sees them (float, double, __half, __nv_bfloat16), their math type and conversions.
template <typename T>
struct Num {
  using Acc = T;
  static __device__ __forceinline__ Acc to_acc(T v) { return v; }
  static __device__ __forceinline__ T from_acc(Acc v) { return v; }
};
template <>
struct Num<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};
// VEC elements of T in one 16-byte access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// M(T, ACC, V) for every element type of the sign kernels: T, its math type Num<T>::Acc and vec_width<T>(), for
// the explicit instantiations.
#define CANDLE_FOR_SIGN_TYPES(M) \
  M(float, float, 4)             \
  M(double, double, 2)           \
  M(__half, float, 8)            \
  M(__nv_bfloat16, float, 8)

}  // namespace
}  // namespace candle

#ifndef __CUDA_ARCH__  // host pass only
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "../checks.h"
#include "../ops.h"

namespace candle {
namespace {

// Every index inside one launch stays below this (32-bit index math in the kernels).
constexpr int64_t kIndexLimit = std::numeric_limits<int32_t>::max();

// More than 48 KB of dynamic shared memory is opt-in per kernel and device: raised whenever a launch needs more
// than any earlier one (the multires head's needs grow with the base map).
inline void ensure_smem(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> granted;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  int& have = granted[{kernel, dev}];
  if (bytes <= have) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  have = bytes;
}

// The PTX arch `kernel` was compiled for as `device` would run it (cached per kernel and device). Below 80 means
// the build had only archs < 8.0 in TORCH_CUDA_ARCH_LIST and this sm_80+ GPU JIT-compiles their PTX, where the
// tensor-core kernels trap (CANDLE_MMA_TRAP): the host code must not launch them.
inline int kernel_ptx_arch(const void* kernel, c10::DeviceIndex device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find({kernel, device});
  if (it != known.end()) return it->second;
  c10::cuda::CUDAGuard guard(device);
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  known[{kernel, device}] = attr.ptxVersion;
  return attr.ptxVersion;
}

// torch's 16-bit types -> CUDA's (same bits).
template <typename S>
struct Raw {
  using type = S;
};
template <>
struct Raw<at::Half> {
  using type = __half;
};
template <>
struct Raw<at::BFloat16> {
  using type = __nv_bfloat16;
};

// float32/float16/bfloat16/float64 (checks.h's check_float leaves float64 out; these kernels take it).
inline void check_float_any(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                   " has dtype ", s, ", expected float32, float16, bfloat16 or float64");
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline unsigned grid_for(int64_t work_items, int64_t per_block, int64_t cap) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work_items + per_block - 1) / per_block, cap)));
}

// Images per launch so that every index of one launch stays below 2^31.
inline int64_t images_per_launch(int64_t per_image, const char* what) {
  TORCH_CHECK_VALUE(per_image <= kIndexLimit, what, " has ", per_image,
                    " elements per image; the CUDA kernels need fewer than 2^31");
  return std::max<int64_t>(1, kIndexLimit / std::max<int64_t>(per_image, 1));
}

enum class Layout { kContiguous, kChannelsLast, kOther };

inline Layout layout_of(const at::Tensor& t) {
  if (t.is_contiguous()) return Layout::kContiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kChannelsLast;
  return Layout::kOther;
}

// x in a layout the sign kernels read in place (layout set to it): x itself when NCHW-contiguous or
// channels_last, else a contiguous copy.
inline at::Tensor in_native_layout(const at::Tensor& x, Layout& layout) {
  layout = layout_of(x);
  if (layout != Layout::kOther) return x;
  layout = Layout::kContiguous;
  return x.contiguous();
}

// The bias rounded to x's dtype (the reference's bias.to(x.dtype)), held in the math type, contiguous.
inline c10::optional<at::Tensor> prepare_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value()) return c10::nullopt;
  check_device(*bias, "bias", c10::kCUDA);
  TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", bias->device(), ", expected ", x.device(),
                    " like x");
  check_float_any(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(1), "bias must have shape (", x.size(1),
                    ",), got ", bias->sizes());
  const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return bias->to(x.scalar_type()).to(math).contiguous();
}


inline void check_sign_input(const at::Tensor& x, const char* name, int64_t min_dim) {
  check_device(x, name, c10::kCUDA);
  check_float_any(x, name);
  TORCH_CHECK_VALUE(x.dim() >= min_dim, name, " must have at least ", min_dim, " dimensions, got ", x.sizes());
  check_nonempty(x, name);
}

}  // namespace
}  // namespace candle
#endif  // __CUDA_ARCH__
