// Instruction-set choice shared by the CPU kernels. CANDLE_EXT_CPU_ISA=portable forces their portable paths
// (the tests use it to check both paths of every kernel on one machine); =avx2 asks for the AVX2 paths (an
// error on a CPU without AVX2); unset or empty lets each kernel take the best path the CPU has. Any other value
// is refused with an error naming it, never ignored.
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace candle {

enum class ForcedIsa { kNone, kPortable, kAvx2 };

inline ForcedIsa forced_isa() {
  const char* isa = std::getenv("CANDLE_EXT_CPU_ISA");
  if (isa == nullptr || *isa == '\0') return ForcedIsa::kNone;
  if (std::strcmp(isa, "portable") == 0) return ForcedIsa::kPortable;
  if (std::strcmp(isa, "avx2") == 0) return ForcedIsa::kAvx2;
  TORCH_CHECK_VALUE(false, "CANDLE_EXT_CPU_ISA='", isa, "' is not a CPU kernel path; expected 'portable' or 'avx2' ",
                    "(or unset for the best one this CPU has)");
  return ForcedIsa::kNone;
}

inline bool portable_isa_forced() { return forced_isa() == ForcedIsa::kPortable; }

// Whether a kernel with an AVX2 path takes it, given whether this CPU supports what that path needs.
inline bool avx2_path(bool cpu_supports) {
  const ForcedIsa f = forced_isa();
  TORCH_CHECK_VALUE(f != ForcedIsa::kAvx2 || cpu_supports,
                    "CANDLE_EXT_CPU_ISA=avx2 was asked for, but this CPU lacks the AVX2 instructions the kernel needs");
  return cpu_supports && f != ForcedIsa::kPortable;
}

}  // namespace candle
