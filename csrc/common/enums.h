#pragma once
// String options of the ops, parsed once on the host.
#include <ATen/ATen.h>

#include <string>


namespace idd_ops {

enum class Metric : int64_t { Euclidean = 0, SqEuclidean = 1, Cosine = 2 };

inline Metric parse_metric(const std::string& metric) {
  if (metric == "euclidean") return Metric::Euclidean;
  if (metric == "sqeuclidean") return Metric::SqEuclidean;
  if (metric == "cosine") return Metric::Cosine;
  TORCH_CHECK_VALUE(false, "metric: expected 'euclidean', 'sqeuclidean' or 'cosine', got '", metric, "'");
}

enum class Reduction { Mean, Sum, None };

inline Reduction parse_reduction(const std::string& reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction: expected 'mean', 'sum' or 'none', got '", reduction, "'");
}

}  // namespace idd_ops
