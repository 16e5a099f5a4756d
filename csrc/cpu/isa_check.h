// The ATen side of isa.h: the path the next kernel call takes, a ValueError when CANDLE_EXT_CPU_ISA names no
// path or one this build/CPU lacks.
#pragma once
#include <c10/util/Exception.h>

#include <string>

#include "isa.h"

namespace candle {

inline cpu::Isa chosen_isa() {
  cpu::Isa isa = cpu::Isa::Portable;
  std::string error;
  TORCH_CHECK_VALUE(cpu::choose_isa(isa, error), error);
  return isa;
}

}  // namespace candle
