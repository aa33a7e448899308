#pragma once
// Pairwise centroid distances and their derivatives, shared by the CPU and CUDA kernels.
#include <c10/macros/Macros.h>
#include <cstdint>

namespace idd_ops {

enum class Metric : int64_t { Euclidean = 0, SqEuclidean = 1, Cosine = 2 };

// Everything a metric needs about a pair (c_i, c_j), accumulated in one pass over channels.
template <typename T>
struct PairStats {
  T sq_diff = 0;  // ||c_i - c_j||^2
  T dot = 0;      // <c_i, c_j>
  C10_HOST_DEVICE void add(T a, T b) {
    const T d = a - b;
    sq_diff += d * d;
    dot += a * b;
  }
};

// dist(c_i, c_j) from the pair's stats and the squared norms of c_i and c_j.
template <typename T>
C10_HOST_DEVICE inline T pair_distance(Metric metric, const PairStats<T>& s, T norm_sq_i,
                                       T norm_sq_j, T eps) {
  switch (metric) {
    case Metric::Euclidean:
      return sqrt(s.sq_diff);
    case Metric::SqEuclidean:
      return s.sq_diff;
    default: {
      const T denom = sqrt(norm_sq_i * norm_sq_j);
      return T(1) - s.dot / (denom > eps ? denom : eps);
    }
  }
}

// d dist(c_i, c_j) / d c_i == a * c_i + b * c_j; returns {a, b}. `dist` is the forward
// value. The euclidean derivative at zero distance is defined as 0 (never NaN).
template <typename T>
struct PairGrad {
  T a;
  T b;
};

template <typename T>
C10_HOST_DEVICE inline PairGrad<T> pair_distance_grad(Metric metric, T dist, T norm_sq_i,
                                                      T norm_sq_j, T eps) {
  switch (metric) {
    case Metric::Euclidean:
      if (dist > T(0)) return {T(1) / dist, T(-1) / dist};
      return {T(0), T(0)};
    case Metric::SqEuclidean:
      return {T(2), T(-2)};
    default: {
      const T denom = sqrt(norm_sq_i * norm_sq_j);
      if (denom > eps) {
        const T cos = T(1) - dist;  // <c_i, c_j> / (|c_i| |c_j|)
        return {cos / norm_sq_i, T(-1) / denom};
      }
      return {T(0), T(-1) / eps};  // denominator clamped: the dot product alone varies
    }
  }
}

}  // namespace idd_ops

namespace idd_ops {

// normalize="mean": each image's matrix is divided by m = max(mean of its n valid
// off-diagonal entries, eps); m = 1 when n == 0 (the matrix is all zero then).
template <typename T>
C10_HOST_DEVICE inline T mean_normalizer(T valid_sum, int64_t n_valid, T eps) {
  if (n_valid == 0) return T(1);
  const T mean = valid_sum / static_cast<T>(n_valid);
  return mean > eps ? mean : eps;
}

// Gradient w.r.t. a raw (unnormalised) valid entry, from the gradient g w.r.t. the
// normalised entry, gD = sum over valid entries of g * D, the normaliser m and n_valid.
// While the mean is clamped to eps, m is a constant and only the first term remains.
template <typename T>
C10_HOST_DEVICE inline T normalized_entry_grad(T g, T gD, T m, int64_t n_valid, T eps) {
  const bool clamped = !(m > eps) || n_valid == 0;
  return clamped ? g / m : g / m - gD / (m * static_cast<T>(n_valid));
}

}  // namespace idd_ops
