// Pairwise distances between per-image class centroids, forward and backward, on CUDA.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/distance.h"
#include "../common/enums.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

// One block per image: squared norms into `norm_sq`, raw distances into `dist`, and the
// image's normaliser (see mean_normalizer) into `scale` with its valid-entry count in `n`.
template <typename scalar_t, typename acc_t>
__global__ void raw_distances_kernel(const scalar_t* __restrict__ c, const int64_t* __restrict__ cnt, int64_t K,
                                     int64_t C, Metric metric, acc_t eps, acc_t* __restrict__ dist,
                                     acc_t* __restrict__ norm_sq, acc_t* __restrict__ scale, int64_t* __restrict__ n) {
  __shared__ acc_t scratch[kThreads];
  const int64_t b = blockIdx.x;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    acc_t s = 0;
    for (int64_t x = 0; x < C; ++x) s += static_cast<acc_t>(c[(b * K + k) * C + x]) * static_cast<acc_t>(c[(b * K + k) * C + x]);
    norm_sq[b * K + k] = s;
  }
  __syncthreads();
  acc_t valid_sum = 0, valid_n = 0;
  for (int64_t e = threadIdx.x; e < K * K; e += blockDim.x) {
    // (i, j) is one entry of image b's matrix
    const int64_t i = e / K, j = e % K, bi = b * K + i, bj = b * K + j;
    acc_t d = 0;
    if (i != j && cnt[bi] > 0 && cnt[bj] > 0) {
      PairStats<acc_t> st;
      for (int64_t x = 0; x < C; ++x) st.add(static_cast<acc_t>(c[bi * C + x]), static_cast<acc_t>(c[bj * C + x]));
      d = pair_distance(metric, st, norm_sq[bi], norm_sq[bj], eps);
      valid_sum += d;
      valid_n += acc_t(1);
    }
    dist[b * K * K + e] = d;
  }
  const acc_t total = block_sum(valid_sum, scratch);
  const int64_t count = static_cast<int64_t>(block_sum(valid_n, scratch));
  if (threadIdx.x == 0) {
    scale[b] = mean_normalizer(total, count, eps);
    n[b] = count;
  }
}

template <typename acc_t>
__global__ void normalize_kernel(acc_t* __restrict__ dist, const acc_t* __restrict__ scale, int64_t KK, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dist[e] /= scale[e / KK];
}

// One block per image: gradient w.r.t. the raw entries, in place of `grad`.
template <typename acc_t>
__global__ void raw_entry_grad_kernel(acc_t* __restrict__ grad, const acc_t* __restrict__ dist,
                                      const acc_t* __restrict__ scale, const int64_t* __restrict__ n, int64_t KK,
                                      acc_t eps) {
  __shared__ acc_t scratch[kThreads];
  const int64_t b = blockIdx.x;
  acc_t part = 0;
  for (int64_t e = threadIdx.x; e < KK; e += blockDim.x) part += grad[b * KK + e] * dist[b * KK + e] / scale[b];
  const acc_t gD = block_sum(part, scratch);
  for (int64_t e = threadIdx.x; e < KK; e += blockDim.x)
    grad[b * KK + e] = normalized_entry_grad(grad[b * KK + e], gD, scale[b], n[b], eps);
}

// One block per (image, class i), threads over channels:
// grad c_i = sum_j (gR[i,j] + gR[j,i]) * (a_ij c_i + b_ij c_j).
template <typename scalar_t, typename acc_t>
__global__ void centroid_grad_kernel(const acc_t* __restrict__ gr, const scalar_t* __restrict__ c,
                                     const int64_t* __restrict__ cnt, const acc_t* __restrict__ dist,
                                     const acc_t* __restrict__ norm_sq, int64_t K, int64_t C, Metric metric, acc_t eps,
                                     acc_t* __restrict__ out) {
  const int64_t bi = blockIdx.x, b = bi / K, i = bi % K;
  for (int64_t x = threadIdx.x; x < C; x += blockDim.x) {
    acc_t g = 0;
    if (cnt[bi] > 0) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t bj = b * K + j;
        if (j == i || cnt[bj] == 0) continue;
        const acc_t w = gr[bi * K + j] + gr[bj * K + i];
        const PairGrad<acc_t> pg = pair_distance_grad(metric, dist[bi * K + j], norm_sq[bi], norm_sq[bj], eps);
        g += w * (pg.a * static_cast<acc_t>(c[bi * C + x]) + pg.b * static_cast<acc_t>(c[bj * C + x]));
      }
    }
    out[bi * C + x] = g;
  }
}

struct RawDistances {
  at::Tensor dist, norm_sq, scale, n;
};

template <typename scalar_t>
RawDistances raw_distances(const at::Tensor& centroids, const at::Tensor& counts, Metric metric, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = centroids.size(0), K = centroids.size(1), C = centroids.size(2);
  const auto opts = centroids.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  RawDistances r{at::empty({B, K, K}, opts), at::empty({B, K}, opts), at::empty({B}, opts),
                 at::empty({B}, counts.options())};
  if (B > 0)
    raw_distances_kernel<scalar_t, acc_t><<<B, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        centroids.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(), K, C, metric, static_cast<acc_t>(eps),
        r.dist.data_ptr<acc_t>(), r.norm_sq.data_ptr<acc_t>(), r.scale.data_ptr<acc_t>(), r.n.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return r;
}

at::Tensor class_distance_matrix_kernel(const at::Tensor& centroids_in, const at::Tensor& counts_in,
                                        c10::string_view metric_name, bool normalize, double eps) {
  const Metric metric = parse_metric(std::string(metric_name));
  const c10::cuda::CUDAGuard guard(centroids_in.device());
  const at::Tensor centroids = centroids_in.contiguous(), counts = counts_in.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, centroids.scalar_type(), "class_distance_matrix_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RawDistances r = raw_distances<scalar_t>(centroids, counts, metric, eps);
    const int64_t total = r.dist.numel(), KK = centroids.size(1) * centroids.size(1);
    if (normalize && total > 0) {
      normalize_kernel<acc_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          r.dist.data_ptr<acc_t>(), r.scale.const_data_ptr<acc_t>(), KK, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    out = r.dist;
  });
  return out.to(centroids.scalar_type());
}

at::Tensor class_distance_matrix_backward_kernel(const at::Tensor& grad_in, const at::Tensor& centroids_in,
                                                 const at::Tensor& counts_in, c10::string_view metric_name,
                                                 bool normalize, double eps) {
  const Metric metric = parse_metric(std::string(metric_name));
  const c10::cuda::CUDAGuard guard(centroids_in.device());
  const at::Tensor centroids = centroids_in.contiguous(), counts = counts_in.contiguous();
  const int64_t B = centroids.size(0), K = centroids.size(1), C = centroids.size(2);
  const auto acc = acc_dtype(centroids.scalar_type());
  at::Tensor gr = grad_in.to(acc).contiguous().clone();
  at::Tensor out = at::zeros({B, K, C}, centroids.options().dtype(acc));
  if (B == 0 || K == 0 || C == 0) return out.to(centroids.scalar_type());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, centroids.scalar_type(), "class_distance_matrix_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RawDistances r = raw_distances<scalar_t>(centroids, counts, metric, eps);
    if (normalize) {
      raw_entry_grad_kernel<acc_t><<<B, kThreads, 0, stream>>>(gr.data_ptr<acc_t>(), r.dist.const_data_ptr<acc_t>(),
                                                              r.scale.const_data_ptr<acc_t>(), r.n.const_data_ptr<int64_t>(),
                                                              K * K, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    centroid_grad_kernel<scalar_t, acc_t><<<B * K, kThreads, 0, stream>>>(
        gr.const_data_ptr<acc_t>(), centroids.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(),
        r.dist.const_data_ptr<acc_t>(), r.norm_sq.const_data_ptr<acc_t>(), K, C, metric, static_cast<acc_t>(eps),
        out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.to(centroids.scalar_type());
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("class_distance_matrix", &class_distance_matrix_kernel);
  m.impl("_class_distance_matrix_backward", &class_distance_matrix_backward_kernel);
}

}  // namespace idd_ops
