// Per-pixel cosine similarity to the pixel's class centroid (the IFVD map) with the pixel
// classes read from a class-slot map (_pixel_centroid_cosine_slots and its backward) on CUDA.
// Ignored pixels (slot -1) score 1 and carry no gradient. The backward's kernels are
// cosine_slots_backward_cuda.cu's.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "centroid_norms.cuh"
#include "cosine_slots_backward.cuh"
#include "cosine_slots_forward.cuh"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_kernel(const at::Tensor& feats_in,
                                                                      const at::Tensor& centroids_in,
                                                                      const at::Tensor& slots_in, double eps,
                                                                      const std::optional<at::Tensor>& counts) {
  check_pixel_centroid_cosine_slots_inputs(feats_in, centroids_in, slots_in, eps, counts);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous(), slots = slots_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3), K = centroids_in.size(1);
  const auto acc = acc_dtype(feats.scalar_type());
  const at::Tensor cent = centroids_in.to(acc).contiguous();
  // the kernel writes every pixel of both maps: no fill launches
  at::Tensor cos = at::empty({B, feats.size(2), feats.size(3)}, feats.options().dtype(acc)), fnorm = at::empty_like(cos);
  if (cos.numel() == 0) return {cos, fnorm};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const CentroidTable table = centroid_table(cent, stream);
  const at::Tensor &cent_t = table.channel_major, &cnorm = table.norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_slots_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>((HW + kCosinePixels - 1) / kCosinePixels),
                    static_cast<unsigned>(std::min(B, kMaxGridYZ)));
    cosine_slots_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), cent_t.const_data_ptr<acc_t>(), cnorm.const_data_ptr<acc_t>(),
        slots.const_data_ptr<int16_t>(), B, C, HW, static_cast<int>(K), static_cast<acc_t>(eps), cos.data_ptr<acc_t>(),
        fnorm.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cos, fnorm};
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_backward_kernel(
    const at::Tensor& grad_in, const at::Tensor& feats_in, const at::Tensor& centroids_in, const at::Tensor& slots_in,
    const at::Tensor& cos_in, const at::Tensor& fnorm_in, double eps, const std::optional<at::Tensor>& counts_in) {
  check_pixel_centroid_cosine_slots_backward_inputs(grad_in, feats_in, centroids_in, slots_in, cos_in, fnorm_in, eps,
                                                    counts_in);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  if (feats_in.numel() == 0)  // no pixels: no gradient, and no table to build
    return {at::empty_like(feats_in, at::MemoryFormat::Contiguous),
            at::zeros_like(centroids_in, at::MemoryFormat::Contiguous)};
  const at::Tensor cent = centroids_in.to(acc_dtype(feats_in.scalar_type())).contiguous();
  const CentroidTable table = centroid_table(cent, c10::cuda::getCurrentCUDAStream());
  auto [grad_f, grad_c] =
      cosine_slots_backward_cuda(grad_in, feats_in, table, slots_in, cos_in, fnorm_in, eps, counts_in, nullptr);
  return {grad_f, grad_c.to(centroids_in.scalar_type())};
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("_pixel_centroid_cosine_slots", &pixel_centroid_cosine_slots_kernel);
  m.impl("_pixel_centroid_cosine_slots_backward", &pixel_centroid_cosine_slots_backward_kernel);
}

}  // namespace idd_ops
