// The names of the elementary position maps and their codes (PositionMap in common/position.h):
// the one place where a name meets a code. idd_ops/position.py reads every code through this
// op once at import, so the Python side never carries numbers of its own.
#include <torch/library.h>

#include <string>
#include <utility>

#include "../common/position.h"

namespace idd_ops {
namespace {

constexpr std::pair<const char*, PositionMap> kPositionMapNames[] = {
    {"horizontal", PositionMap::Horizontal},
    {"vertical", PositionMap::Vertical},
    {"gaussian", PositionMap::Gaussian},
    {"horizontal_stripes", PositionMap::HorizontalStripes},
    {"vertical_stripes", PositionMap::VerticalStripes},
    {"sin_x", PositionMap::SinX},
    {"cos_x", PositionMap::CosX},
    {"sin_y", PositionMap::SinY},
    {"cos_y", PositionMap::CosY},
};

int64_t position_map_code(c10::string_view name) {
  std::string known;
  for (const auto& entry : kPositionMapNames) {
    if (name == entry.first) return static_cast<int64_t>(entry.second);
    known += known.empty() ? "" : ", ";
    known += entry.first;
  }
  TORCH_CHECK_VALUE(false, "name: unknown elementary position map '", std::string(name), "'; expected one of ", known);
}

}  // namespace

// No tensor arguments: one kernel for every dispatch key.
TORCH_LIBRARY_FRAGMENT(idd_ops, m) {
  m.def("_position_map_code(str name) -> int", &position_map_code);
}

}  // namespace idd_ops
