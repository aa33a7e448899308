// Per-image class centroids of a feature map, forward and backward, on CUDA.
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/class_centroids_ordered.h"
#include "cuda_utils.cuh"
#include "label_view.cuh"

namespace idd_ops {
namespace {

// Channels summed per block: the block's labels are read once and reused for all of them.
constexpr int kChannelTile = 8;

// One block per (image, channel tile): per-class sums of the tile in shared memory. Tiles start
// at channel c_first (a launch covers at most kMaxGridYZ of them, along grid y), and the launch that starts
// at channel 0 writes the counts.
// A warp whose 32 pixels share one class (the common case: labels are piecewise constant)
// reduces by shuffles and adds once; a mixed warp adds per lane.
template <typename scalar_t, typename label_t>
__global__ void class_centroids_kernel_impl(const scalar_t* __restrict__ feats, const label_t* __restrict__ labels,
                                            LabelView v, int64_t C, int64_t c_first,
                                            at::opmath_type<scalar_t>* __restrict__ centroids,
                                            int64_t* __restrict__ counts) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem[];
  acc_t* sums = reinterpret_cast<acc_t*>(smem);                                  // [K][kChannelTile]
  int64_t* cnt = reinterpret_cast<int64_t*>(sums + v.num_classes * kChannelTile);  // [K]
  const int64_t K = v.num_classes, HW = v.H * v.W, b = blockIdx.x, c0 = c_first + blockIdx.y * kChannelTile;
  for (int64_t e = threadIdx.x; e < K * kChannelTile; e += blockDim.x) sums[e] = acc_t(0);
  for (int64_t e = threadIdx.x; e < K; e += blockDim.x) cnt[e] = 0;
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int64_t warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t base = warp * 32; base < HW; base += warps * 32) {  // warp-uniform trip count
    const int64_t p = base + lane;
    const int64_t k = p < HW ? pixel_class(labels, v, b, p) : -1;
    const int64_t k0 = __shfl_sync(0xffffffffu, k, 0);
    if (__all_sync(0xffffffffu, k == k0)) {
      if (k0 < 0) continue;
      for (int t = 0; t < kChannelTile && c0 + t < C; ++t) {
        // (b, c0 + t, p) is one element of the input
        acc_t x = static_cast<acc_t>(feats[(b * C + c0 + t) * HW + p]);
        for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
        if (lane == 0) atomicAdd(&sums[k0 * kChannelTile + t], x);
      }
      if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(&cnt[k0]), 32ull);
    } else if (k >= 0) {
      for (int t = 0; t < kChannelTile && c0 + t < C; ++t)
        atomicAdd(&sums[k * kChannelTile + t], static_cast<acc_t>(feats[(b * C + c0 + t) * HW + p]));
      atomicAdd(reinterpret_cast<unsigned long long*>(&cnt[k]), 1ull);
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < K * kChannelTile; e += blockDim.x) {
    const int64_t k = e / kChannelTile, c = c0 + e % kChannelTile;
    if (c < C) centroids[(b * K + k) * C + c] = cnt[k] > 0 ? sums[e] / static_cast<acc_t>(cnt[k]) : acc_t(0);
  }
  if (c0 == 0)
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) counts[b * K + k] = cnt[k];
}

// grad_feats[b, c, p] = grad_centroids[b, y_p, c] / counts[b, y_p], 0 where y_p is ignored or
// its count is 0 (counts passed in directly need not match the labels; the CPU kernel agrees).
template <typename scalar_t, typename label_t>
__global__ void class_centroids_backward_kernel_impl(const at::opmath_type<scalar_t>* __restrict__ grad_centroids,
                                                     const label_t* __restrict__ labels,
                                                     const int64_t* __restrict__ counts, LabelView v, int64_t C,
                                                     int64_t total, scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = v.H * v.W, K = v.num_classes;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (b, c, p) is one element of the output
    const int64_t p = e % HW, c = (e / HW) % C, b = e / (HW * C);
    const int64_t k = pixel_class(labels, v, b, p);
    const int64_t n = k >= 0 ? counts[b * K + k] : 0;
    const acc_t g = n > 0 ? grad_centroids[(b * K + k) * C + c] / static_cast<acc_t>(n) : acc_t(0);
    grad[e] = static_cast<scalar_t>(g);
  }
}


std::tuple<at::Tensor, at::Tensor> class_centroids_kernel(const at::Tensor& feats_in, const at::Tensor& labels_in,
                                                          int64_t num_classes, int64_t ignore_index) {
  check_class_centroids_inputs(feats_in, labels_in, num_classes);
  // The fused kernel adds in shared memory with float atomics, in an order that varies.
  if (at::globalContext().deterministicAlgorithms())
    return class_centroids_ordered(feats_in, labels_in, num_classes, ignore_index);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous();
  const at::Tensor labels = canonical_labels(labels_in);
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3);
  const auto acc = acc_dtype(feats.scalar_type());
  at::Tensor centroids = at::zeros({B, num_classes, C}, feats.options().dtype(acc));
  at::Tensor counts = at::zeros({B, num_classes}, feats.options().dtype(at::kLong));
  if (B == 0 || H * W == 0) return {centroids, counts};
  const LabelView v = label_view(labels, H, W, num_classes, ignore_index);
  const int64_t tiles = std::max<int64_t>(1, (C + kChannelTile - 1) / kChannelTile);
  const unsigned int images = grid_x(B, "feats");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_centroids_cuda", [&] {
    using feat_t = scalar_t;
    using acc_t = at::opmath_type<feat_t>;
    const size_t shared = num_classes * (kChannelTile * sizeof(acc_t) + sizeof(int64_t));
    IDD_DISPATCH_LABEL_TYPES(labels.scalar_type(), "class_centroids_cuda_labels", [&] {
      allow_shared_memory(class_centroids_kernel_impl<feat_t, scalar_t>, shared, feats.get_device(), num_classes);
      for (int64_t first = 0; first < tiles; first += kMaxGridYZ) {
        const dim3 grid(images, static_cast<unsigned int>(std::min(tiles - first, kMaxGridYZ)));
        class_centroids_kernel_impl<feat_t, scalar_t><<<grid, kThreads, shared, stream>>>(
            feats.const_data_ptr<feat_t>(), labels.const_data_ptr<scalar_t>(), v, C, first * kChannelTile,
            centroids.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {centroids, counts};
}

at::Tensor class_centroids_backward_kernel(const at::Tensor& grad_centroids_in, const at::Tensor& labels_in,
                                           const at::Tensor& counts_in, int64_t height, int64_t width,
                                           at::ScalarType dtype, int64_t ignore_index) {
  check_class_centroids_backward_inputs(grad_centroids_in, labels_in, counts_in, height, width, dtype);
  const c10::cuda::CUDAGuard guard(grad_centroids_in.device());
  const at::Tensor grad_centroids = grad_centroids_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const at::Tensor labels = canonical_labels(labels_in);
  const int64_t B = grad_centroids.size(0), K = grad_centroids.size(1), C = grad_centroids.size(2);
  at::Tensor grad = at::empty({B, C, height, width}, grad_centroids.options().dtype(dtype));
  const int64_t total = grad.numel();
  if (total == 0) return grad;
  const LabelView v = label_view(labels, height, width, K, ignore_index);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_centroids_backward_cuda", [&] {
    using feat_t = scalar_t;
    using acc_t = at::opmath_type<feat_t>;
    IDD_DISPATCH_LABEL_TYPES(labels.scalar_type(), "class_centroids_backward_cuda_labels", [&] {
      class_centroids_backward_kernel_impl<feat_t, scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          grad_centroids.const_data_ptr<acc_t>(), labels.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(),
          v, C, total, grad.data_ptr<feat_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("class_centroids", &class_centroids_kernel);
  m.impl("_class_centroids_backward", &class_centroids_backward_kernel);
}

}  // namespace idd_ops
