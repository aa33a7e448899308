#pragma once
// Entry points of position_encoding_loss_tables_cuda.cu (maps from per-block column tables, no
// per-element div/mod), which position_encoding_loss_cuda.cu calls for maps up to
// position_tables_max_width(dtype) columns wide (the table lives in shared memory). Inputs arrive
// checked by the caller.
#include <ATen/ATen.h>

namespace idd_ops {

int64_t position_tables_max_width(at::ScalarType dtype);
at::Tensor position_encoding_loss_tables(const at::Tensor& pred, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                         c10::string_view reduction);
at::Tensor position_encoding_loss_backward_tables(const at::Tensor& grad, const at::Tensor& pred,
                                                  at::IntArrayRef kinds, at::ArrayRef<double> params,
                                                  c10::string_view reduction);

}  // namespace idd_ops
