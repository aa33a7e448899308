#pragma once
// Entry points of the CUDA kernels behind IDD_OPS_CUDA_NEXT (csrc/common/cuda_next.h): the
// registered kernels of the same op stem call these when the switch is on. Inputs arrive
// checked by the caller.
#include <ATen/ATen.h>

#include <tuple>

namespace idd_ops {

// softmax_kl_next_cuda.cu: one read of student and teacher per pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_next(const at::Tensor& student, const at::Tensor& teacher,
                                                              double temperature);
at::Tensor softmax_kl_backward_next(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                    const at::Tensor& lse_student, const at::Tensor& lse_teacher, double temperature);

// position_encoding_loss_next_cuda.cu: maps from per-block column tables, no per-element div/mod.
// Serves maps up to position_next_max_width(dtype) columns wide (the table lives in shared memory).
int64_t position_next_max_width(at::ScalarType dtype);
at::Tensor position_encoding_loss_next(const at::Tensor& pred, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                       c10::string_view reduction);
at::Tensor position_encoding_loss_backward_next(const at::Tensor& grad, const at::Tensor& pred, at::IntArrayRef kinds,
                                                at::ArrayRef<double> params, c10::string_view reduction);

}  // namespace idd_ops
