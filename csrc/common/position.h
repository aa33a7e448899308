#pragma once
// Analytic position maps, shared by the CPU and CUDA kernels. Every map is a product of a
// row factor and a column factor, G[y, x] = rowf(y) * colf(x), so kernels generate targets
// from two short 1-D tables (or directly) and never hold an [M, H, W] map stack.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "wide_math.h"

namespace idd_ops {

// Codes of the elementary maps; idd_ops/position.py expands user-facing kinds into these.
enum class PositionMap : int64_t {
  Horizontal = 0,          // x / (W - 1)
  Vertical = 1,            // y / (H - 1)
  Gaussian = 2,            // exp(-((u - 1/2)^2 + (v - 1/2)^2) / (2 param^2)), u, v in [0, 1]
  HorizontalStripes = 3,   // floor(param * y / H) mod 2: param horizontal bands
  VerticalStripes = 4,     // floor(param * x / W) mod 2
  SinX = 5,                // (1 + sin(2 pi param u)) / 2
  CosX = 6,
  SinY = 7,
  CosY = 8,
};
constexpr int64_t kNumPositionMaps = 9;  // codes are 0 .. kNumPositionMaps - 1

// Factor of map `kind` along one axis: axis 0 is rows (index i of n = H), axis 1 columns.
// `param` stays a double: a stripe count is an integer up to 2^31 - 1, which float32 would round
// from 2^24 on; the other kinds take it in T.
template <typename T>
C10_HOST_DEVICE inline T position_factor(int64_t kind, double param_in, int64_t axis, int64_t i, int64_t n) {
  const T t = n > 1 ? static_cast<T>(i) / static_cast<T>(n - 1) : T(0);
  const T param = static_cast<T>(param_in);
  const T two_pi = T(6.283185307179586476925286766559);
  switch (static_cast<PositionMap>(kind)) {
    case PositionMap::Horizontal:
      return axis == 1 ? t : T(1);
    case PositionMap::Vertical:
      return axis == 0 ? t : T(1);
    case PositionMap::Gaussian: {
      const T d = (t - T(0.5)) / param;
      return T(wide_exp(T(-0.5) * d * d));
    }
    case PositionMap::HorizontalStripes:
      return axis == 0 ? static_cast<T>((static_cast<int64_t>(param_in) * i / n) % 2) : T(1);
    case PositionMap::VerticalStripes:
      return axis == 1 ? static_cast<T>((static_cast<int64_t>(param_in) * i / n) % 2) : T(1);
    case PositionMap::SinX:
      return axis == 1 ? T(T(0.5) + T(0.5) * wide_sin(two_pi * param * t)) : T(1);
    case PositionMap::CosX:
      return axis == 1 ? T(T(0.5) + T(0.5) * wide_cos(two_pi * param * t)) : T(1);
    case PositionMap::SinY:
      return axis == 0 ? T(T(0.5) + T(0.5) * wide_sin(two_pi * param * t)) : T(1);
    default:  // CosY
      return axis == 0 ? T(T(0.5) + T(0.5) * wide_cos(two_pi * param * t)) : T(1);
  }
}

}  // namespace idd_ops
