// IFVD's two maps in one op (_ifvd_maps) on CUDA: one launch builds both networks' centroid tables
// from their float64 class sums (centroid_tables_from_sums_kernel), one computes both cosine maps
// (cosine_pair_forward_kernel, grid z = the network), where the centroid divisions and a slot-map
// cosine call per network took seven (a clamp, two divisions, a table and a map per network).
// The backward is the slot-map cosine's with counts (csrc/autograd). IFVD's loss (_ifvd_loss)
// is the same two launches, the maps' also adding the squared differences (its tiles' last
// blocks, then the grid's last: grid_tickets.cuh), and its backward the slot-map cosine's on the
// student's table and norms the forward built (returned for it), whose factor pass forms the
// loss's gradient map from the two maps, where mse_loss and its backward took about five
// launches and a table launch of the backward's own one more.
// Python takes these ops only under IDD_OPS_CUDA_NEXT's "ifvd" group (idd_ops/_switches.py): no
// GPU has run them yet.
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../common/ifvd_maps.h"
#include "centroid_norms.cuh"
#include "cosine_slots_backward.cuh"
#include "cosine_slots_forward.cuh"
#include "cuda_utils.cuh"
#include "grid_tickets.cuh"

namespace idd_ops {
namespace {

// Each network's inputs and outputs of the pair forward: [0] the student's, [1] the teacher's.
template <typename scalar_t>
struct CosinePair {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* feats[2];
  const acc_t* cent_t[2];
  const acc_t* cnorm[2];
  acc_t* cos[2];
  acc_t* fnorm[2];
  int64_t C[2];
};

// IFVD's loss from the pair's maps (none where value is null): the sum of (cos_s - cos_t)^2 over
// every pixel, times factor, into value (0-dim). The later of a tile's two blocks (one a network;
// counters[1 + tile]) adds the tile's squares into parts[tile] in a fixed order, the grid's last
// tile (counters[0]) the parts in tile order: the same bits on every run.
template <typename acc_t>
struct PairLoss {
  acc_t* value;
  double* parts;
  unsigned* counters;
  double factor;
};

// Block (x, b, n): network n's forward block of the single-network kernel, whose work grows with
// that network's channels (a teacher of 2048 against a student of 512: four times the student's).
// It writes the teacher's feature norms too, which nothing reads (256 KB at the Cityscapes shape,
// against 671 MB of features read): the block stays the single-network kernel's code. With a
// loss, tile (x, b) is its two blocks' pixels: pixels [32 x, 32 x + 32) of images b, b + gridDim.y,
// ...; the maps' values the other block wrote are loaded through L2 (ld.global.cg), as the
// tickets' fences order them there.
// 6 blocks an SM, the maps-only kernel's 40 registers (ptxas, sm_90; 42 for float64): left free,
// the loss's tail took it to 56 and 4 blocks, where the maps' loads need the blocks in flight. At
// 40 no instance spills (float, double, half, bfloat16).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 6)
    cosine_pair_forward_kernel(const CosinePair<scalar_t> pair, const int16_t* __restrict__ slots, int64_t B,
                               int64_t HW, int K, at::opmath_type<scalar_t> eps,
                               const PairLoss<at::opmath_type<scalar_t>> loss) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part_dot[kCosineGroups][kCosinePixels], part_nf[kCosineGroups][kCosinePixels];
  const int n = blockIdx.z;
  cosine_slots_forward_block<scalar_t>(pair.feats[n], pair.cent_t[n], pair.cnorm[n], slots, B, pair.C[n], HW, K, eps,
                                       pair.cos[n], pair.fnorm[n], part_dot, part_nf);
  if (loss.value == nullptr) return;  // the maps alone: block-uniform
  __shared__ double scratch[kThreads];
  __shared__ bool last;
  const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;
  if (!last_to_arrive(loss.counters + 1 + tile, 2, &last)) return;
  const int lane = threadIdx.x % kCosinePixels, group = threadIdx.x / kCosinePixels;
  const int64_t p = blockIdx.x * static_cast<int64_t>(kCosinePixels) + lane;
  double sum = 0;
  if (p < HW) {
    for (int64_t b = blockIdx.y + static_cast<int64_t>(group) * gridDim.y; b < B;
         b += static_cast<int64_t>(kCosineGroups) * gridDim.y) {
      const double d = static_cast<double>(__ldcg(pair.cos[0] + b * HW + p)) - __ldcg(pair.cos[1] + b * HW + p);
      sum += d * d;
    }
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) loss.parts[tile] = sum;
  const unsigned tiles = gridDim.x * gridDim.y;
  if (!last_to_arrive(loss.counters, tiles, &last)) return;
  double total = 0;
  for (unsigned t = threadIdx.x; t < tiles; t += kThreads) total += __ldcg(loss.parts + t);
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) *loss.value = static_cast<acc_t>(total * loss.factor);
}

// The outputs of both ops: (loss, cos_s, cos_t, fnorm_s, cent_s, table_s, norms_s), the loss
// undefined for the maps, cent_s (the student's centroids, row-major) for the maps alone.
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Both maps, and with `loss_mean` the loss.
Outputs pair_maps(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& student_sums,
                  const at::Tensor& teacher_sums, const at::Tensor& counts_in, const at::Tensor& slots_in, double eps,
                  std::optional<bool> loss_mean) {
  check_ifvd_maps_inputs(student_in, teacher_in, student_sums, teacher_sums, counts_in, slots_in, eps);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::Tensor sums_s = student_sums.contiguous(), sums_t = teacher_sums.contiguous();
  const at::Tensor counts = counts_in.contiguous(), slots = slots_in.contiguous();
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), K = sums_s.size(1);
  const int64_t H = student.size(2), W = student.size(3), HW = H * W, BK = B * K;
  const auto acc = student.options().dtype(acc_dtype(student.scalar_type()));
  // every output is written whole by the two launches: no fills (but the loss of no pixels)
  at::Tensor cos_s = at::empty({B, H, W}, acc), cos_t = at::empty_like(cos_s), fnorm_s = at::empty_like(cos_s);
  at::Tensor fnorm_t = at::empty_like(cos_s), cent_s = loss_mean ? at::Tensor() : at::empty({B, K, Cs}, acc);
  at::Tensor table_s = at::empty({B, Cs, K}, acc), table_t = at::empty({B, Ct, K}, acc);
  at::Tensor norms_s = at::empty({B, K}, acc), norms_t = at::empty_like(norms_s);
  at::Tensor loss;
  if (loss_mean) {
    loss = at::empty({}, acc);
    if (B * HW == 0) loss.zero_();  // no pixels: no pair launch
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ifvd_maps_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (BK == 0) return;
    const SumsTable<acc_t> table_of_s{sums_s.const_data_ptr<double>(), Cs, table_s.data_ptr<acc_t>(),
                                      norms_s.data_ptr<acc_t>(), loss_mean ? nullptr : cent_s.data_ptr<acc_t>()};
    const SumsTable<acc_t> table_of_t{sums_t.const_data_ptr<double>(), Ct, table_t.data_ptr<acc_t>(),
                                      norms_t.data_ptr<acc_t>(), nullptr};
    centroid_tables_from_sums_kernel<acc_t><<<blocks_for(2 * BK * 32), kThreads, 0, stream>>>(
        table_of_s, table_of_t, counts.const_data_ptr<int64_t>(), K, BK);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (HW == 0) return;
    CosinePair<scalar_t> pair{{student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>()},
                              {table_s.const_data_ptr<acc_t>(), table_t.const_data_ptr<acc_t>()},
                              {norms_s.const_data_ptr<acc_t>(), norms_t.const_data_ptr<acc_t>()},
                              {cos_s.data_ptr<acc_t>(), cos_t.data_ptr<acc_t>()},
                              {fnorm_s.data_ptr<acc_t>(), fnorm_t.data_ptr<acc_t>()},
                              {Cs, Ct}};
    const dim3 grid(grid_x((HW + kCosinePixels - 1) / kCosinePixels, "student"),
                    static_cast<unsigned>(std::min(B, kMaxGridYZ)), 2);
    const int64_t tiles = static_cast<int64_t>(grid.x) * grid.y;
    // the tiles' parts from the caching allocator and the counters (held until the launch is queued)
    at::Tensor parts, counters;
    PairLoss<acc_t> sum{nullptr, nullptr, nullptr, 0.0};
    if (loss_mean) {
      parts = at::empty({tiles}, student.options().dtype(at::kDouble));
      counters = grid_ticket_counters(student.device(), 1 + tiles);
      sum = {loss.data_ptr<acc_t>(), parts.data_ptr<double>(),
             reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int>()), ifvd_loss_factor(cos_s, *loss_mean)};
    }
    cosine_pair_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        pair, slots.const_data_ptr<int16_t>(), B, HW, static_cast<int>(K), static_cast<acc_t>(eps), sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, cos_s, cos_t, fnorm_s, cent_s, table_s, norms_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ifvd_maps_kernel(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_sums,
    const at::Tensor& teacher_sums, const at::Tensor& counts, const at::Tensor& slots, double eps) {
  auto [loss, cos_s, cos_t, fnorm_s, cent_s, table_s, norms_s] =
      pair_maps(student, teacher, student_sums, teacher_sums, counts, slots, eps, std::nullopt);
  return {cos_s, cos_t, fnorm_s, cent_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ifvd_loss_kernel(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_sums,
    const at::Tensor& teacher_sums, const at::Tensor& counts, const at::Tensor& slots, double eps, bool mean) {
  auto [loss, cos_s, cos_t, fnorm_s, cent_s, table_s, norms_s] =
      pair_maps(student, teacher, student_sums, teacher_sums, counts, slots, eps, mean);
  return {loss, cos_s, cos_t, fnorm_s, table_s, norms_s};
}

at::Tensor ifvd_loss_backward_kernel(const at::Tensor& grad, const at::Tensor& student,
                                     const at::Tensor& student_table, const at::Tensor& student_norms,
                                     const at::Tensor& slots, const at::Tensor& cos_student,
                                     const at::Tensor& cos_teacher, const at::Tensor& feat_norms,
                                     const at::Tensor& counts, double eps, bool mean) {
  check_ifvd_loss_backward_inputs(grad, student, student_table, student_norms, slots, cos_student, cos_teacher,
                                  feat_norms, counts, eps);
  const IfvdLossGrad ifvd{cos_teacher, 2 * ifvd_loss_factor(cos_student, mean)};
  // the forward's table: no table launch here
  const CentroidTable table{student_table.contiguous(), student_norms.contiguous()};
  return std::get<0>(cosine_slots_backward_cuda(grad.to(cos_student.scalar_type()), student, table, slots,
                                                cos_student, feat_norms, eps, counts, &ifvd));
}

}  // namespace

// The CUDA kernels of the schemas declared in idd_ops.cpp (other devices: csrc/composite/ifvd_maps.cpp).
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("_ifvd_maps", &ifvd_maps_kernel);
  m.impl("_ifvd_loss", &ifvd_loss_kernel);
  m.impl("_ifvd_loss_backward", &ifvd_loss_backward_kernel);
}

}  // namespace idd_ops
