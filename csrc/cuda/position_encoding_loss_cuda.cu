// MSE between predicted position maps and analytic ones generated on the fly, on CUDA: maps up to
// position_tables_max_width columns wide from column tables (position_encoding_loss_tables_cuda.cu),
// wider ones by the per-element kernels here.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/enums.h"
#include "../common/position.h"
#include "cuda_utils.cuh"
#include "position_tables.cuh"
#include "position_specs.cuh"

namespace idd_ops {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t target(const MapSpecs& maps, int64_t m, int64_t y, int64_t x, int64_t H, int64_t W) {
  const double p = maps.param[m];
  return position_factor<acc_t>(maps.kind[m], p, 0, y, H) * position_factor<acc_t>(maps.kind[m], p, 1, x, W);
}

// Per-block partial sums of squared errors (no atomics: the host side adds the partials),
// and, for reduction "none", the elementwise errors.
template <typename scalar_t>
__global__ void position_loss_kernel_impl(const scalar_t* __restrict__ pred, MapSpecs maps, int64_t M, int64_t H,
                                          int64_t W, int64_t total, at::opmath_type<scalar_t>* __restrict__ partial,
                                          scalar_t* __restrict__ errors) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads];
  acc_t sum = 0;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (b, m, y, x) is one element of pred
    const int64_t x = e % W, y = (e / W) % H, m = (e / (H * W)) % M;
    const acc_t d = static_cast<acc_t>(pred[e]) - target<acc_t>(maps, m, y, x, H, W);
    if (errors != nullptr) errors[e] = static_cast<scalar_t>(d * d);
    sum += d * d;
  }
  const acc_t block_total = block_sum(sum, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = block_total;
}

template <typename scalar_t>
__global__ void position_loss_backward_kernel_impl(const at::opmath_type<scalar_t>* __restrict__ grad, bool elementwise,
                                                   const scalar_t* __restrict__ pred, MapSpecs maps, int64_t M,
                                                   int64_t H, int64_t W, int64_t total, at::opmath_type<scalar_t> scale,
                                                   scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = e % W, y = (e / W) % H, m = (e / (H * W)) % M;
    const acc_t g = elementwise ? grad[e] : grad[0];
    out[e] = static_cast<scalar_t>(g * scale * (static_cast<acc_t>(pred[e]) - target<acc_t>(maps, m, y, x, H, W)));
  }
}

at::Tensor position_encoding_loss_kernel(const at::Tensor& pred_in, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                         c10::string_view reduction) {
  check_position_encoding_loss_inputs(pred_in, kinds, params);
  if (pred_in.size(3) <= position_tables_max_width(pred_in.scalar_type()))
    return position_encoding_loss_tables(pred_in, kinds, params, reduction);
  const MapSpecs maps = map_specs(kinds, params);
  const Reduction red = parse_reduction(std::string(reduction));
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const int64_t total = pred.numel(), M = pred.size(1), H = pred.size(2), W = pred.size(3);
  const auto acc = acc_dtype(pred.scalar_type());
  const int64_t blocks = blocks_for(total);
  at::Tensor partial = at::zeros({blocks}, pred.options().dtype(acc));
  at::Tensor errors = red == Reduction::None ? at::empty_like(pred) : at::Tensor();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "position_encoding_loss_cuda", [&] {
      position_loss_kernel_impl<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          pred.const_data_ptr<scalar_t>(), maps, M, H, W, total, partial.data_ptr<at::opmath_type<scalar_t>>(),
          errors.defined() ? errors.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (red == Reduction::None) return errors;
  // mean/sum stay in the accumulation dtype: a half "sum" would overflow (the caller casts)
  const at::Tensor sum = partial.sum();
  return red == Reduction::Mean ? sum / static_cast<double>(std::max<int64_t>(total, 1)) : sum;
}

at::Tensor position_encoding_loss_backward_kernel(const at::Tensor& grad_in, const at::Tensor& pred_in,
                                                  at::IntArrayRef kinds, at::ArrayRef<double> params,
                                                  c10::string_view reduction) {
  const Reduction red = parse_reduction(std::string(reduction));
  check_position_encoding_loss_backward_inputs(grad_in, pred_in, kinds, params, red);
  if (pred_in.size(3) <= position_tables_max_width(pred_in.scalar_type()))
    return position_encoding_loss_backward_tables(grad_in, pred_in, kinds, params, reduction);
  const MapSpecs maps = map_specs(kinds, params);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor grad = loss_grad_acc(grad_in, pred, red);
  const int64_t total = pred.numel(), M = pred.size(1), H = pred.size(2), W = pred.size(3);
  at::Tensor out = at::empty_like(pred);
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "position_encoding_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = acc_t(2) / (red == Reduction::Mean ? static_cast<acc_t>(total) : acc_t(1));
    position_loss_backward_kernel_impl<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<acc_t>(), red == Reduction::None, pred.const_data_ptr<scalar_t>(), maps, M, H, W, total,
        scale, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("position_encoding_loss", &position_encoding_loss_kernel);
  m.impl("_position_encoding_loss_backward", &position_encoding_loss_backward_kernel);
}

}  // namespace idd_ops
