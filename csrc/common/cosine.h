#pragma once
// Cosine similarity between a pixel's feature and its class centroid, as IFVD uses it, shared
// by the CPU and CUDA kernels: cos = <f, c> / max(|f| |c|, eps) (torch.cosine_similarity's
// rule), and its derivative d cos = alpha * (other vector) + beta * (own vector).
#include <c10/macros/Macros.h>

namespace idd_ops {

template <typename T>
C10_HOST_DEVICE inline T clamped_cosine(T dot, T norm_f, T norm_c, T eps) {
  const T denom = norm_f * norm_c;
  return dot / (denom > eps ? denom : eps);
}

// d cos / d f = alpha * c + beta_f * f and d cos / d c = alpha * f + beta_c * c.
template <typename T>
struct CosineGrad {
  T alpha, beta_f, beta_c;
};

template <typename T>
C10_HOST_DEVICE inline CosineGrad<T> clamped_cosine_grad(T cos, T norm_f, T norm_c, T eps) {
  const T denom = norm_f * norm_c;
  if (!(denom > eps)) return {T(1) / eps, T(0), T(0)};  // denominator clamped: only the dot varies
  return {T(1) / denom, -cos / (norm_f * norm_f), -cos / (norm_c * norm_c)};
}

}  // namespace idd_ops
