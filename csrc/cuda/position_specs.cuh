#pragma once
// The (kind, param) of every map of a position_encoding_loss launch, carried by value in the
// kernel arguments (codes of common/position.h).
#include <ATen/ATen.h>

namespace idd_ops {

// Most maps a launch carries.
constexpr int kMaxMaps = 64;

struct MapSpecs {
  int64_t kind[kMaxMaps];
  double param[kMaxMaps];
};

inline MapSpecs map_specs(at::IntArrayRef kinds, at::ArrayRef<double> params) {
  TORCH_CHECK_VALUE(kinds.size() <= static_cast<size_t>(kMaxMaps), "kinds: at most ", kMaxMaps,
                    " maps on CUDA, got ", kinds.size());
  MapSpecs s{};
  for (size_t m = 0; m < kinds.size(); ++m) {
    s.kind[m] = kinds[m];
    s.param[m] = params[m];
  }
  return s;
}

}  // namespace idd_ops
