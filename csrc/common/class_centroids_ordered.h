#pragma once
// Class centroids from ATen calls with a fixed summation order (see
// composite/class_centroids_ordered.cpp): the CUDA op's path under
// torch.use_deterministic_algorithms(True), registered as _class_centroids_ordered too so
// that the CPU tests cover it.
#include <ATen/ATen.h>

#include <tuple>

namespace idd_ops {

std::tuple<at::Tensor, at::Tensor> class_centroids_ordered(const at::Tensor& feats, const at::Tensor& labels,
                                                           int64_t num_classes, int64_t ignore_index);

}  // namespace idd_ops
