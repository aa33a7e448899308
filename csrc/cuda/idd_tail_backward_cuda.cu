// The fused IDD tail's backward on CUDA, one launch: the student sums' gradient
// grad_sum[b, i, c] = (rowsum_j a_ij x_i[c] + sum_j b_ij x_j[c]) / count_i, x the centred
// centroids, {a, b} the metric's derivative times the pair weight W_ij
// (idd_tail_backward_composite's formulas), formed per (i, j) from dist and the image's row of
// stats as the j loop goes. Host side and registration: idd_tail_cuda.cu; types and helpers:
// idd_tail.cuh.
#include <limits>

#include "idd_tail.cuh"

namespace idd_ops {
namespace {

constexpr int kBwdRows = 64;   // classes i a block
constexpr int kBwdCols = 64;   // channels a block
constexpr int kBwdInner = 16;  // classes j a step
constexpr int kRowParts = kThreads / kBwdRows;  // threads sharing one coefficient row
static_assert(kBwdInner % kRowParts == 0 && kThreads == 16 * 16, "backward block shape");

template <typename sum_t, typename acc_t>
struct TailBackwardArgs {
  SumsView<sum_t> student;
  const int64_t* counts_t;
  int64_t tb, tk;
  const acc_t* dist;    // [B, 2, K, K]
  const double* stats;  // [B, K + 1, kNumStats]
  const float* grad_float;  // the loss's gradient: one of these two, in the loss's dtype
  const double* grad_double;
  int64_t grad_stride;  // 0 for a reduced loss's one value
  int K, tiles_i, tiles_c, metric;
  acc_t eps;
  sum_t* out;  // [B, K, C] contiguous
};

// One block: a 64 x 64 block of (i, c) of one image; 16 x 16 threads, 4 x 4 outputs each.
template <typename sum_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) idd_tail_backward_kernel(const TailBackwardArgs<sum_t, acc_t> args) {
  __shared__ acc_t sX[kBwdInner][kBwdCols];  // x_j[c] of this step's classes
  __shared__ acc_t sB[kBwdInner][kBwdRows];  // b_ij, by j
  __shared__ acc_t sRowA[kRowParts][kBwdRows];
  __shared__ sum_t sShift[kBwdCols];  // the anchor's centroid, in sum_t like every centroid
  __shared__ sum_t sInvI[kBwdRows], sInvJ[kBwdInner];  // 1 / count of the rows i, of this step's j
  __shared__ acc_t sInv[kBwdRows], sNorm[kBwdRows];
  __shared__ bool sPs[kBwdRows], sPt[kBwdRows];
  __shared__ int iscratch[kWarps];
  const SumsView<sum_t>& v = args.student;
  const int K = args.K, tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int ct = blockIdx.x % args.tiles_c, it = (blockIdx.x / args.tiles_c) % args.tiles_i;
  const int64_t b = blockIdx.x / (static_cast<int64_t>(args.tiles_c) * args.tiles_i);
  const int i0 = it * kBwdRows;
  const int64_t c0 = static_cast<int64_t>(ct) * kBwdCols;
  const int64_t KK = static_cast<int64_t>(K) * K;
  const acc_t* rs_of = args.dist + b * 2 * KK;
  const acc_t* rt_of = rs_of + KK;

  const double* row = args.stats + (b * (K + 1) + K) * kNumStats;
  const acc_t ms = static_cast<acc_t>(row[kStatStudentDivisor]), mt = static_cast<acc_t>(row[kStatTeacherDivisor]);
  const acc_t kappa = static_cast<acc_t>(row[kStatKappa]);
  const acc_t g = args.grad_double != nullptr ? static_cast<acc_t>(args.grad_double[b * args.grad_stride])
                                              : static_cast<acc_t>(args.grad_float[b * args.grad_stride]);
  const acc_t alpha = acc_t(2) * g * static_cast<acc_t>(row[kStatPairScale]) / ms;
  const bool cosine = args.metric == static_cast<int>(Metric::Cosine);

  const int anchor = cosine ? K : first_present(v, b, K, iscratch);
  if (tid < kBwdCols) {
    const int64_t c = c0 + tid;
    sShift[tid] = anchor < K && c < v.C ? v.centroid(b, anchor, c, v.inverse_count(b, anchor)) : sum_t(0);
  } else if (tid < kBwdCols + kBwdRows) {
    const int li = tid - kBwdCols, i = i0 + li;
    const int64_t n = i < K ? v.count(b, i) : 0;
    // 1 / count in acc_t: the composite's last step, (grad_c * inverse_counts) in its dtype
    sInv[li] = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
    sInvI[li] = i < K ? v.inverse_count(b, i) : sum_t(0);
    sPs[li] = n > 0;
    sPt[li] = i < K && __ldg(args.counts_t + b * args.tb + i * args.tk) > 0;
    sNorm[li] = i < K ? rs_of[static_cast<int64_t>(i) * K + i] : acc_t(0);
  }
  __syncthreads();

  acc_t acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int r2 = 0; r2 < 4; ++r2) acc[r][r2] = acc_t(0);
  const int li = tid % kBwdRows, i = i0 + li;  // this thread's coefficient row
  acc_t row_a = acc_t(0);
  for (int j0 = 0; j0 < K; j0 += kBwdInner) {
    if (tid < kBwdInner) sInvJ[tid] = j0 + tid < K ? v.inverse_count(b, j0 + tid) : sum_t(0);
    __syncthreads();
    for (int e = tid; e < kBwdInner * kBwdCols; e += kThreads) {
      const int jj = e / kBwdCols, cc = e % kBwdCols, j = j0 + jj;
      const int64_t c = c0 + cc;
      // centred in sum_t, rounded once, as the forward's staged values
      sX[jj][cc] = j < K && c < v.C ? static_cast<acc_t>(v.centroid(b, j, c, sInvJ[jj]) - sShift[cc]) : acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < kBwdInner / kRowParts; ++k) {
      const int jj = tid / kBwdRows + kRowParts * k, j = j0 + jj;
      acc_t a = acc_t(0), bc = acc_t(0);
      if (i < K && j < K && i != j && sPs[li] && sInvJ[jj] != sum_t(0)) {
        // dist is symmetric: row j, column i reads along a row for neighbouring i
        const acc_t rs = rs_of[static_cast<int64_t>(j) * K + i], rt = rt_of[static_cast<int64_t>(j) * K + i];
        const bool pair = sPt[li] && __ldg(args.counts_t + b * args.tb + j * args.tk) > 0;
        const acc_t w = alpha * ((pair ? rs / ms - rt / mt : acc_t(0)) - kappa);
        if (args.metric == static_cast<int>(Metric::Euclidean)) {
          a = rs > acc_t(0) ? w / rs : acc_t(0);
          bc = -a;
        } else if (args.metric == static_cast<int>(Metric::SqEuclidean)) {
          a = acc_t(2) * w;
          bc = -a;
        } else {
          const acc_t ni = sNorm[li], prod = sqrt(ni * rs_of[static_cast<int64_t>(j) * K + j]);
          a = prod > args.eps ? w * (acc_t(1) - rs) / ni : acc_t(0);
          bc = -w / (prod > args.eps ? prod : args.eps);
        }
      }
      sB[jj][li] = bc;
      row_a += a;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kBwdInner; ++jj) {
      acc_t av[4], xv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        av[r] = sB[jj][ty + 16 * r];
        xv[r] = sX[jj][tx + 16 * r];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) acc[r][r2] = fma(av[r], xv[r2], acc[r][r2]);
    }
    __syncthreads();  // sX and sB are rewritten by the next step
  }
  sRowA[tid / kBwdRows][li] = row_a;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int lr = ty + 16 * r, gi = i0 + lr;
    acc_t rowsum = sRowA[0][lr];
    for (int part = 1; part < kRowParts; ++part) rowsum += sRowA[part][lr];
#pragma unroll
    for (int r2 = 0; r2 < 4; ++r2) {
      const int64_t c = c0 + tx + 16 * r2;
      if (gi < K && c < v.C) {
        const acc_t xi = static_cast<acc_t>(v.centroid(b, gi, c, sInvI[lr]) - sShift[tx + 16 * r2]);
        args.out[(b * K + gi) * v.C + c] = static_cast<sum_t>((acc[r][r2] + rowsum * xi) * sInv[lr]);
      }
    }
  }
}

}  // namespace

void idd_tail_fused_backward(const at::Tensor& grad, const at::Tensor& student_sums, const at::Tensor& student_counts,
                             const at::Tensor& teacher_counts, const at::Tensor& dist, const at::Tensor& stats,
                             Metric metric, double eps, Reduction reduction, at::Tensor& out) {
  const int64_t B = student_sums.size(0), K = student_sums.size(1), C = student_sums.size(2);
  if (B == 0 || K == 0 || C == 0) return;
  const int tiles_i = static_cast<int>((K + kBwdRows - 1) / kBwdRows);
  const int64_t tiles_c = (C + kBwdCols - 1) / kBwdCols;
  TORCH_CHECK(B * tiles_i * tiles_c <= std::numeric_limits<int>::max(), "_idd_tail_backward: ", B * tiles_i * tiles_c,
              " blocks do not fit the grid");
  dispatch_tail_types(student_sums.scalar_type(), dist.scalar_type(), "_idd_tail_backward", [&](auto sum_tag,
                                                                                                auto acc_tag) {
    using sum_t = decltype(sum_tag);
    using acc_t = decltype(acc_tag);
    const TailBackwardArgs<sum_t, acc_t> args{sums_view<sum_t>(student_sums, student_counts),
                                              teacher_counts.const_data_ptr<int64_t>(),
                                              teacher_counts.stride(0),
                                              teacher_counts.stride(1),
                                              dist.const_data_ptr<acc_t>(),
                                              stats.const_data_ptr<double>(),
                                              grad.scalar_type() == at::kFloat ? grad.const_data_ptr<float>() : nullptr,
                                              grad.scalar_type() == at::kDouble ? grad.const_data_ptr<double>() : nullptr,
                                              reduction == Reduction::None ? grad.stride(0) : 0,
                                              static_cast<int>(K),
                                              tiles_i,
                                              static_cast<int>(tiles_c),
                                              static_cast<int>(metric),
                                              static_cast<acc_t>(eps),
                                              out.mutable_data_ptr<sum_t>()};
    idd_tail_backward_kernel<sum_t, acc_t><<<static_cast<unsigned>(B * tiles_i * tiles_c), kThreads, 0,
                                             c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace idd_ops
