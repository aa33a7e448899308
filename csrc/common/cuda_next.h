#pragma once
// CUDA kernels and GPU formulations written since the last GPU run are compiled in but switched
// off until a GPU has validated them: IDD_OPS_CUDA_NEXT=1 selects them (read once per process;
// idd_ops/_switches.py is the Python side of the same switch). tools/gpu_check.sh runs its
// stages under both settings; the first GPU session that passes them switches them on and
// deletes what they replace.
#include <cstdlib>
#include <cstring>

namespace idd_ops {

inline bool cuda_next_enabled() {
  static const bool on = [] {
    const char* value = std::getenv("IDD_OPS_CUDA_NEXT");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return on;
}

}  // namespace idd_ops
