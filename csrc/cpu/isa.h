// The one place where the CPU kernels' instruction-set path is chosen. Torch-free (the kernel cores and the
// cross-compiled test driver in python_tests/cross/ include it; isa_check.h turns its errors into ValueError).
//
//   Isa::Avx512    x86-64 whose CPU reports AVX-512 F, BW and VPOPCNTDQ at run time (and AVX2/F16C, which they
//                  imply on every such CPU): Intel Ice Lake and later server/client cores, AMD Zen 4 and later
//   Isa::Avx2      x86-64 whose CPU reports AVX2 and F16C at run time (both x86 paths carry target attributes,
//                  the build passes no -m flags, so one binary runs on every x86-64)
//   Isa::Neon      aarch64 (Advanced SIMD is part of the aarch64 baseline, so it is always there)
//   Isa::Portable  plain C++, any CPU; the fallback of every path
//
// CANDLE_EXT_CPU_ISA is read on every call (the tests switch it between calls): unset or empty takes the best
// path of this CPU; `portable` forces the portable paths (the tests use it to check every path of every kernel
// on one machine); `avx512` / `avx2` / `neon` ask for that path (an error where this build or CPU has none; an
// AVX-512 CPU also runs the AVX2 path). Any other value is refused with an error naming it, never ignored. A
// kernel that has no such path for a call (float64 sign_pack, a huge-padding conv on AVX2/AVX-512) takes the
// portable one. A new path adds an enum value, its names in isa_name() / isa_title(), its detection in
// isa_available(), its files csrc/cpu/*_<isa>.cpp and its cases in dispatch.cpp.
//
// CANDLE_EXT_SIMDE_AVX512 (defined only by the torch-free test driver's second build, python_tests/
// test_cross_isa.py) compiles the AVX-512 sources against SIMDe's portable implementations of the intrinsics
// (avx512_intrin.h) and makes the AVX-512 path available on any x86-64, so that its results are checked on
// machines without AVX-512.
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CANDLE_HAVE_AVX2_PATH 1
#define CANDLE_HAVE_AVX512_PATH 1
// What the AVX2 path's functions may use: the instructions isa_available() checks for Isa::Avx2 (a target
// attribute per function, never a global -m flag, so that the rest of the binary runs on any x86-64).
#define CANDLE_AVX2 __attribute__((target("avx2,f16c")))
#define CANDLE_AVX2_INLINE inline __attribute__((always_inline, target("avx2,f16c")))
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define CANDLE_HAVE_NEON_PATH 1
#endif

namespace candle {
namespace cpu {

enum class Isa { Portable, Avx2, Avx512, Neon };
constexpr Isa kIsas[] = {Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon};

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
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
    case Isa::Avx512:
#if defined(CANDLE_EXT_SIMDE_AVX512)
      return "AVX-512 (SIMDe emulation)";
#else
      return "AVX-512";
#endif
    case Isa::Avx2:
      return "AVX2";
    case Isa::Neon:
      return "NEON";
    default:
      return "portable";
  }
}

// The CPU features a path is chosen by, as a refusal names them (AVX-512 F and BW alone, e.g. Skylake-SP and
// Cascade Lake, lack the popcount).
inline const char* isa_needs(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "AVX-512 F, BW and VPOPCNTDQ";
    case Isa::Avx2:
      return "AVX2 and F16C";
    case Isa::Neon:
      return "an aarch64 CPU";
    default:
      return "nothing";
  }
}

// Whether this build has `isa`'s path and this CPU runs it (the environment aside).
inline bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::Portable:
      return true;
#if defined(CANDLE_HAVE_AVX2_PATH)
    case Isa::Avx2: {
      static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
      return avx2;
    }
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
    case Isa::Avx512: {
#if defined(CANDLE_EXT_SIMDE_AVX512)
      return true;  // emulated by SIMDe: runs on any x86-64 (test driver only)
#else
      // F: the 512-bit registers; BW: byte/word masks (sign_pack); VPOPCNTDQ: the conv's popcount. libgcc's
      // check also requires the OS to save the AVX-512 state (XCR0), so a kernel that disables it is seen.
      static const bool avx512 = isa_available(Isa::Avx2) && __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vpopcntdq");
      return avx512;
#endif
    }
#endif
#if defined(CANDLE_HAVE_NEON_PATH)
    case Isa::Neon:
      return true;
#endif
    default:
      return false;
  }
}

// The best path compiled into this build that this CPU runs, ignoring the environment.
inline Isa best_isa() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Neon}) {
    if (isa_available(isa)) return isa;
  }
  return Isa::Portable;
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
    if (!isa_available(candidate)) {
      error = std::string("CANDLE_EXT_CPU_ISA=") + want + " was asked for, but this CPU lacks the " +
              isa_title(candidate) + " instructions the kernel needs (" + isa_needs(candidate) +
              "; its best path: " + isa_name(best) + ")";
      return false;
    }
    isa = candidate;
    return true;
  }
  error = std::string("CANDLE_EXT_CPU_ISA='") + want +
          "' is not a CPU kernel path; expected 'portable', 'avx2', 'avx512' or 'neon' (or unset for the best one "
          "this CPU has)";
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
  } else if (best == Isa::Avx2) {
    line += "; this CPU has no AVX-512 VPOPCNTDQ";
  }
  return line;
}

}  // namespace cpu
}  // namespace candle
