// The one place where the CPU kernels' instruction-set path is chosen. Torch-free (the kernel cores and the
// cross-compiled test driver in python_tests/cross/ include it; isa_check.h turns its errors into ValueError).
//
//   Isa::Avx2      x86-64 whose CPU reports AVX2 and F16C at run time (the code carries target attributes,
//                  the build passes no -m flags, so one binary runs on every x86-64)
//   Isa::Neon      aarch64 (Advanced SIMD is part of the aarch64 baseline, so it is always there)
//   Isa::Portable  plain C++, any CPU; the fallback of every path
//
// CANDLE_EXT_CPU_ISA is read on every call (the tests switch it between calls): unset or empty takes the best
// path of this CPU; `portable` forces the portable paths (the tests use it to check both paths of every kernel
// on one machine); `avx2` / `neon` ask for that path (an error where this build or CPU has none). Any other
// value is refused with an error naming it, never ignored. A kernel that has no such path for a call (float64
// sign_pack, a huge-padding conv on AVX2) takes the portable one. A new path (say AVX-512) adds an enum value,
// its name in isa_name() and kNames, its detection in best_isa(), its files csrc/cpu/*_<isa>.cpp and its cases
// in dispatch.cpp.
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CANDLE_HAVE_AVX2_PATH 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define CANDLE_HAVE_NEON_PATH 1
#endif

namespace candle {
namespace cpu {

enum class Isa { Portable, Avx2, Neon };
constexpr Isa kIsas[] = {Isa::Portable, Isa::Avx2, Isa::Neon};

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

// The instruction set a path needs, as the messages name it.
inline const char* isa_title(Isa isa) {
  switch (isa) {
    case Isa::Avx2:
      return "AVX2";
    case Isa::Neon:
      return "NEON";
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

// The path the next kernel call takes, from CANDLE_EXT_CPU_ISA. false, with `error` saying why, when the
// variable names no path or one this build/CPU lacks.
inline bool choose_isa(Isa& isa, std::string& error) {
  const char* want = std::getenv("CANDLE_EXT_CPU_ISA");
  const Isa best = best_isa();
  if (want == nullptr || *want == '\0') {
    isa = best;
    return true;
  }
  for (Isa candidate : kIsas) {
    if (std::strcmp(want, isa_name(candidate)) != 0) continue;
    if (candidate != Isa::Portable && candidate != best) {
      error = std::string("CANDLE_EXT_CPU_ISA=") + want + " was asked for, but this CPU lacks the " +
              isa_title(candidate) + " instructions the kernel needs (its best path: " + isa_name(best) + ")";
      return false;
    }
    isa = candidate;
    return true;
  }
  error = std::string("CANDLE_EXT_CPU_ISA='") + want +
          "' is not a CPU kernel path; expected 'portable', 'avx2' or 'neon' (or unset for the best one this "
          "CPU has)";
  return false;
}

// One line for `python -m candle_ext.info`: the machine and the path in use.
inline std::string isa_description() {
#if defined(__x86_64__)
  const std::string machine = "x86-64";
#elif defined(__aarch64__)
  const std::string machine = "aarch64";
#else
  const std::string machine = "this CPU";
#endif
  Isa isa;
  std::string error;
  if (!choose_isa(isa, error)) return machine + ", no kernels run: " + error;
  std::string line = machine + ", " + isa_title(isa) + " kernels";
  const Isa best = best_isa();
  if (isa != best) {
    line += std::string(": CANDLE_EXT_CPU_ISA=") + isa_name(isa) + ", " + isa_title(best) + " available";
  } else if (best == Isa::Portable && machine == "x86-64") {
    line += " (no AVX2)";
  }
  return line;
}

}  // namespace cpu
}  // namespace candle
