// Instruction-set choice shared by the CPU kernels. CANDLE_EXT_CPU_ISA=portable forces their portable paths
// (the tests use it to check both paths of every kernel on one machine).
#pragma once
#include <cstdlib>
#include <cstring>

namespace candle {

inline bool portable_isa_forced() {
  const char* isa = std::getenv("CANDLE_EXT_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, "portable") == 0;
}

}  // namespace candle
