// Per-pixel cosine similarity to the pixel's class centroid (the IFVD map), forward and
// backward, on CUDA, with the pixel classes read from labels (pixel_centroid_cosine, the tested
// default; the slot-map ops are in pixel_centroid_cosine_slots_cuda.cu). Ignored pixels score 1
// and carry no gradient.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/cosine.h"
#include "centroid_norms.cuh"
#include "cuda_utils.cuh"
#include "label_view.cuh"

namespace idd_ops {
namespace {

// One thread per pixel; neighbouring threads read neighbouring pixels of each channel.
template <typename scalar_t, typename label_t>
__global__ void cosine_forward_kernel(const scalar_t* __restrict__ f, const at::opmath_type<scalar_t>* __restrict__ cent,
                                      const at::opmath_type<scalar_t>* __restrict__ cnorm,
                                      const label_t* __restrict__ labels, LabelView v, int64_t B, int64_t C,
                                      at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t>* __restrict__ cos,
                                      at::opmath_type<scalar_t>* __restrict__ fnorm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = v.H * v.W, K = v.num_classes;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * HW;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (b, p) is one pixel
    const int64_t b = e / HW, p = e % HW, k = pixel_class(labels, v, b, p);
    acc_t dot = 0, nf = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t x = static_cast<acc_t>(f[(b * C + c) * HW + p]);
      nf += x * x;
      if (k >= 0) dot += x * cent[(b * K + k) * C + c];
    }
    const acc_t norm = sqrt(nf);
    fnorm[e] = norm;
    cos[e] = k >= 0 ? clamped_cosine(dot, norm, cnorm[b * K + k], eps) : acc_t(1);
  }
}

// Per pixel: a = g * alpha, bf = g * beta_f, and the class's sum of g * beta_c.
template <typename acc_t, typename label_t>
__global__ void cosine_factors_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ cos,
                                      const acc_t* __restrict__ fnorm, const acc_t* __restrict__ cnorm,
                                      const label_t* __restrict__ labels, LabelView v, int64_t B, acc_t eps,
                                      acc_t* __restrict__ a, acc_t* __restrict__ bf, acc_t* __restrict__ bc_sum) {
  const int64_t HW = v.H * v.W, K = v.num_classes;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * HW;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / HW, k = pixel_class(labels, v, b, e % HW);
    if (k < 0) {
      a[e] = 0, bf[e] = 0;
      continue;
    }
    const CosineGrad<acc_t> cg = clamped_cosine_grad(cos[e], fnorm[e], cnorm[b * K + k], eps);
    a[e] = grad[e] * cg.alpha, bf[e] = grad[e] * cg.beta_f;
    atomicAdd(&bc_sum[b * K + k], grad[e] * cg.beta_c);
  }
}

// One block per (image, channel): writes that row of grad_feats and the channel's gradient
// for every class centroid (class sums in shared memory).
template <typename scalar_t, typename label_t>
__global__ void cosine_backward_rows_kernel(const scalar_t* __restrict__ f, const at::opmath_type<scalar_t>* __restrict__ cent,
                                            const at::opmath_type<scalar_t>* __restrict__ a,
                                            const at::opmath_type<scalar_t>* __restrict__ bf,
                                            const at::opmath_type<scalar_t>* __restrict__ bc_sum,
                                            const label_t* __restrict__ labels, LabelView v, int64_t C,
                                            scalar_t* __restrict__ grad_f, at::opmath_type<scalar_t>* __restrict__ grad_c) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem[];
  acc_t* sums = reinterpret_cast<acc_t*>(smem);  // [K]
  const int64_t HW = v.H * v.W, K = v.num_classes, row = blockIdx.x, b = row / C, c = row % C;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) sums[k] = 0;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const int64_t k = pixel_class(labels, v, b, p), bp = b * HW + p;
    const acc_t x = static_cast<acc_t>(f[row * HW + p]);
    // an ignored pixel's gradient is 0, not 0 * x, so that a NaN there stays out (METHOD.md 2)
    grad_f[row * HW + p] = static_cast<scalar_t>(k >= 0 ? a[bp] * cent[(b * K + k) * C + c] + bf[bp] * x : acc_t(0));
    if (k >= 0) atomicAdd(&sums[k], a[bp] * x);
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    grad_c[(b * K + k) * C + c] = sums[k] + bc_sum[b * K + k] * cent[(b * K + k) * C + c];
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_kernel(const at::Tensor& feats_in, const at::Tensor& centroids_in,
                                                                const at::Tensor& labels_in, int64_t ignore_index,
                                                                double eps) {
  const int64_t K = centroids_in.size(1);
  check_pixel_centroid_cosine_inputs(feats_in, centroids_in, labels_in, eps);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous(), labels = canonical_labels(labels_in);
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3);
  const auto acc = acc_dtype(feats.scalar_type());
  const at::Tensor cent = centroids_in.to(acc).contiguous();
  at::Tensor cos = at::ones({B, H, W}, feats.options().dtype(acc)), fnorm = at::zeros_like(cos);
  if (cos.numel() == 0) return {cos, fnorm};
  const LabelView v = label_view(labels, H, W, K, ignore_index);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor cnorm = centroid_norms(cent, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_cuda", [&] {
    using feat_t = scalar_t;
    using acc_t = at::opmath_type<feat_t>;
    IDD_DISPATCH_LABEL_TYPES(labels.scalar_type(), "pixel_centroid_cosine_cuda_labels", [&] {
      cosine_forward_kernel<feat_t, scalar_t><<<blocks_for(B * H * W), kThreads, 0, stream>>>(
          feats.const_data_ptr<feat_t>(), cent.const_data_ptr<acc_t>(), cnorm.const_data_ptr<acc_t>(),
          labels.const_data_ptr<scalar_t>(), v, B, C, static_cast<acc_t>(eps), cos.data_ptr<acc_t>(),
          fnorm.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {cos, fnorm};
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_backward_kernel(
    const at::Tensor& grad_in, const at::Tensor& feats_in, const at::Tensor& centroids_in, const at::Tensor& labels_in,
    const at::Tensor& cos_in, const at::Tensor& fnorm_in, int64_t ignore_index, double eps) {
  check_pixel_centroid_cosine_backward_inputs(grad_in, feats_in, centroids_in, labels_in, cos_in, fnorm_in, eps);
  at::globalContext().alertNotDeterministic("idd_ops::_pixel_centroid_cosine_backward (CUDA, float atomics)");
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const CosineBackwardTensors t = cosine_backward_tensors(grad_in, feats_in, centroids_in, cos_in, fnorm_in);
  const at::Tensor &feats = t.feats, &cent = t.cent, &grad = t.grad, &cosv = t.cos, &fnorm = t.fnorm;
  const at::Tensor &grad_f = t.grad_f, &grad_c = t.grad_c, labels = canonical_labels(labels_in);
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), K = centroids_in.size(1);
  if (feats.numel() == 0) return {grad_f, grad_c.to(centroids_in.scalar_type())};
  at::Tensor bc_sum = at::zeros({B, K}, cent.options());
  at::Tensor a = at::empty({B, H * W}, cent.options()), bf = at::empty_like(a);
  const LabelView v = label_view(labels, H, W, K, ignore_index);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor cnorm = centroid_norms(cent, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_backward_cuda", [&] {
    using feat_t = scalar_t;
    using acc_t = at::opmath_type<feat_t>;
    IDD_DISPATCH_LABEL_TYPES(labels.scalar_type(), "pixel_centroid_cosine_backward_cuda_labels", [&] {
      cosine_factors_kernel<acc_t, scalar_t><<<blocks_for(B * H * W), kThreads, 0, stream>>>(
          grad.const_data_ptr<acc_t>(), cosv.const_data_ptr<acc_t>(), fnorm.const_data_ptr<acc_t>(),
          cnorm.const_data_ptr<acc_t>(), labels.const_data_ptr<scalar_t>(), v, B, static_cast<acc_t>(eps),
          a.data_ptr<acc_t>(), bf.data_ptr<acc_t>(), bc_sum.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // K class sums per block: past this GPU's opt-in limit, a ValueError naming num_classes
      allow_shared_memory(cosine_backward_rows_kernel<feat_t, scalar_t>, K * sizeof(acc_t), feats.get_device(), K);
      cosine_backward_rows_kernel<feat_t, scalar_t><<<row_blocks(B, C), kThreads, K * sizeof(acc_t), stream>>>(
          feats.const_data_ptr<feat_t>(), cent.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
          bf.const_data_ptr<acc_t>(), bc_sum.const_data_ptr<acc_t>(), labels.const_data_ptr<scalar_t>(), v, C,
          grad_f.data_ptr<feat_t>(), grad_c.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_f, grad_c.to(centroids_in.scalar_type())};
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("pixel_centroid_cosine", &pixel_centroid_cosine_kernel);
  m.impl("_pixel_centroid_cosine_backward", &pixel_centroid_cosine_backward_kernel);
}

}  // namespace idd_ops
