// The one place where the CPU kernels' instruction-set path is chosen. Torch-free (the kernel cores and the
// cross-compiled test driver in python_tests/cross/ include it).
//
//   Isa::Avx2      x86-64 whose CPU reports AVX2 and F16C at run time (the code carries target attributes,
//                  the build passes no -m flags, so one binary runs on every x86-64)
//   Isa::Neon      aarch64 (Advanced SIMD is part of the aarch64 baseline, so it is always there)
//   Isa::Portable  plain C++, any CPU; the fallback of every path, and what CANDLE_EXT_CPU_ISA=portable forces
//
// CANDLE_EXT_CPU_ISA is read on every call (the tests switch it between calls): `portable` forces the portable
// path, anything else (or unset) takes the best path of this CPU. A new path (say AVX-512) adds an enum value,
// its detection in best_isa(), its name in isa_name(), its files csrc/cpu/*_<isa>.cpp and its cases in
// dispatch.cpp; a kernel without that path falls back to the next one there.
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CANDLE_HAVE_AVX2_PATH 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define CANDLE_HAVE_NEON_PATH 1
#endif

namespace candle {
namespace cpu {

enum class Isa { Portable, Avx2, Neon };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2:
      return "avx2";
    case Isa::Neon:
      return "neon";
    default:
      return "portable";
  }
}

// The best path compiled into this build that this CPU runs, ignoring the environment.
inline Isa best_isa() {
#if defined(CANDLE_HAVE_AVX2_PATH)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return avx2 ? Isa::Avx2 : Isa::Portable;
#elif defined(CANDLE_HAVE_NEON_PATH)
  return Isa::Neon;
#else
  return Isa::Portable;
#endif
}

inline bool portable_isa_forced() {
  const char* isa = std::getenv("CANDLE_EXT_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, "portable") == 0;
}

// The path the next kernel call takes.
inline Isa active_isa() { return portable_isa_forced() ? Isa::Portable : best_isa(); }

// One line for `python -m candle_ext.info`: the machine and the path in use.
inline const char* isa_description() {
#if defined(__x86_64__)
  if (best_isa() == Isa::Portable) return "x86-64, portable kernels (no AVX2)";
  return portable_isa_forced() ? "x86-64, portable kernels: CANDLE_EXT_CPU_ISA=portable, AVX2 available"
                               : "x86-64, AVX2 kernels";
#elif defined(CANDLE_HAVE_NEON_PATH)
  return portable_isa_forced() ? "aarch64, portable kernels: CANDLE_EXT_CPU_ISA=portable, NEON available"
                               : "aarch64, NEON kernels";
#else
  return "portable kernels";
#endif
}

}  // namespace cpu
}  // namespace candle
