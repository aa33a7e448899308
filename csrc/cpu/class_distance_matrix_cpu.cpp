// Pairwise distances between per-image class centroids, forward and backward, on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/distance.h"
#include "../common/enums.h"

namespace idd_ops {
namespace {

// Raw distances R[b, i, j] (0 on the diagonal and for absent classes) into `dist`, and
// the squared centroid norms into `norm_sq`; both in the accumulation type.
template <typename scalar_t, typename acc_t>
void raw_distances(const scalar_t* c, const int64_t* cnt, int64_t B, int64_t K, int64_t C, Metric metric,
                   acc_t eps, acc_t* dist, acc_t* norm_sq) {
  at::parallel_for(0, B * K, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t bk = r0; bk < r1; ++bk) {
      acc_t s = 0;
      for (int64_t x = 0; x < C; ++x) s += static_cast<acc_t>(c[bk * C + x]) * static_cast<acc_t>(c[bk * C + x]);
      norm_sq[bk] = s;
    }
  });
  at::parallel_for(0, B * K, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t bi = r0; bi < r1; ++bi) {
      // (b, i) is one row of the distance matrix
      const int64_t b = bi / K, i = bi % K;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t bj = b * K + j;
        acc_t d = 0;
        if (i != j && cnt[bi] > 0 && cnt[bj] > 0) {
          PairStats<acc_t> st;
          for (int64_t x = 0; x < C; ++x) st.add(static_cast<acc_t>(c[bi * C + x]), static_cast<acc_t>(c[bj * C + x]));
          d = pair_distance(metric, st, norm_sq[bi], norm_sq[bj], eps);
        }
        dist[bi * K + j] = d;
      }
    }
  });
}

// Normaliser m[b] of every image (see mean_normalizer) and its valid-entry count.
template <typename acc_t>
void normalizers(const acc_t* dist, const int64_t* cnt, int64_t B, int64_t K, acc_t eps, acc_t* m, int64_t* n) {
  for (int64_t b = 0; b < B; ++b) {
    acc_t sum = 0;
    int64_t valid = 0;
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j)
        if (i != j && cnt[b * K + i] > 0 && cnt[b * K + j] > 0) {
          sum += dist[(b * K + i) * K + j];
          ++valid;
        }
    m[b] = mean_normalizer(sum, valid, eps);
    n[b] = valid;
  }
}

at::Tensor class_distance_matrix_kernel(const at::Tensor& centroids_in, const at::Tensor& counts_in,
                                        c10::string_view metric_name, bool normalize, double eps) {
  const Metric metric = parse_metric(std::string(metric_name));
  const at::Tensor centroids = centroids_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const int64_t B = centroids.size(0), K = centroids.size(1), C = centroids.size(2);
  const auto acc = acc_dtype(centroids.scalar_type());
  at::Tensor dist = at::empty({B, K, K}, centroids.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, centroids.scalar_type(), "class_distance_matrix_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* d = dist.data_ptr<acc_t>();
    std::vector<acc_t> norm_sq(B * K);
    const int64_t* cnt = counts.const_data_ptr<int64_t>();
    raw_distances(centroids.const_data_ptr<scalar_t>(), cnt, B, K, C, metric, static_cast<acc_t>(eps), d, norm_sq.data());
    if (normalize) {
      std::vector<acc_t> m(B);
      std::vector<int64_t> n(B);
      normalizers(d, cnt, B, K, static_cast<acc_t>(eps), m.data(), n.data());
      for (int64_t e = 0; e < B * K * K; ++e) d[e] /= m[e / (K * K)];
    }
  });
  return dist.to(centroids.scalar_type());
}

at::Tensor class_distance_matrix_backward_kernel(const at::Tensor& grad_in, const at::Tensor& centroids_in,
                                                 const at::Tensor& counts_in, c10::string_view metric_name,
                                                 bool normalize, double eps) {
  const Metric metric = parse_metric(std::string(metric_name));
  const at::Tensor centroids = centroids_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const int64_t B = centroids.size(0), K = centroids.size(1), C = centroids.size(2);
  const auto acc = acc_dtype(centroids.scalar_type());
  const at::Tensor grad = grad_in.to(acc).contiguous();
  at::Tensor grad_c = at::zeros({B, K, C}, centroids.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, centroids.scalar_type(), "class_distance_matrix_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t e = static_cast<acc_t>(eps);
    const scalar_t* c = centroids.const_data_ptr<scalar_t>();
    const int64_t* cnt = counts.const_data_ptr<int64_t>();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    std::vector<acc_t> raw(B * K * K), norm_sq(B * K), m(B, acc_t(1));
    std::vector<int64_t> n(B, 0);
    raw_distances(c, cnt, B, K, C, metric, e, raw.data(), norm_sq.data());
    if (normalize) normalizers(raw.data(), cnt, B, K, e, m.data(), n.data());
    // gr[b, i, j]: gradient w.r.t. the raw entry R[b, i, j]
    std::vector<acc_t> gr(B * K * K, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      acc_t gD = 0;
      for (int64_t ij = b * K * K; ij < (b + 1) * K * K; ++ij) gD += g[ij] * raw[ij] / m[b];
      for (int64_t ij = b * K * K; ij < (b + 1) * K * K; ++ij)
        gr[ij] = normalize ? normalized_entry_grad(g[ij], gD, m[b], n[b], e) : g[ij];
    }
    acc_t* out = grad_c.data_ptr<acc_t>();
    at::parallel_for(0, B * K, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t bi = r0; bi < r1; ++bi) {
        const int64_t b = bi / K, i = bi % K;
        if (cnt[bi] == 0) continue;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t bj = b * K + j;
          if (j == i || cnt[bj] == 0) continue;
          // R[i, j] and R[j, i] are the same function of c_i
          const acc_t w = gr[bi * K + j] + gr[bj * K + i];
          const PairGrad<acc_t> pg = pair_distance_grad(metric, raw[bi * K + j], norm_sq[bi], norm_sq[bj], e);
          for (int64_t x = 0; x < C; ++x)
            out[bi * C + x] += w * (pg.a * static_cast<acc_t>(c[bi * C + x]) + pg.b * static_cast<acc_t>(c[bj * C + x]));
        }
      }
    });
  });
  return grad_c.to(centroids.scalar_type());
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("class_distance_matrix", &class_distance_matrix_kernel);
  m.impl("_class_distance_matrix_backward", &class_distance_matrix_backward_kernel);
}

}  // namespace idd_ops
