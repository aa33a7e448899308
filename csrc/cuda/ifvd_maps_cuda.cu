// IFVD's two maps in one op (_ifvd_maps) on CUDA: one launch builds both networks' centroid tables
// from their float64 class sums (centroid_tables_from_sums_kernel), one computes both cosine maps
// (cosine_pair_forward_kernel, grid z = the network), where the centroid divisions and a slot-map
// cosine call per network took seven (a clamp, two divisions, a table and a map per network).
// The backward is the slot-map cosine's with counts (csrc/autograd). Python takes this op only
// under IDD_OPS_CUDA_NEXT=1 (idd_ops/_switches.py): no GPU has run it yet.
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common/ifvd_maps.h"
#include "centroid_norms.cuh"
#include "cosine_slots_forward.cuh"
#include "cuda_utils.cuh"

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

// Block (x, b, n): network n's forward block of the single-network kernel, whose work grows with
// that network's channels (a teacher of 2048 against a student of 512: four times the student's).
// It writes the teacher's feature norms too, which nothing reads (256 KB at the Cityscapes shape,
// against 671 MB of features read): the block stays the single-network kernel's code.
template <typename scalar_t>
__global__ void cosine_pair_forward_kernel(const CosinePair<scalar_t> pair, const int16_t* __restrict__ slots,
                                           int64_t B, int64_t HW, int K, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part_dot[kCosineGroups][kCosinePixels], part_nf[kCosineGroups][kCosinePixels];
  const int n = blockIdx.z;
  cosine_slots_forward_block<scalar_t>(pair.feats[n], pair.cent_t[n], pair.cnorm[n], slots, B, pair.C[n], HW, K, eps,
                                       pair.cos[n], pair.fnorm[n], part_dot, part_nf);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ifvd_maps_kernel(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& student_sums,
    const at::Tensor& teacher_sums, const at::Tensor& counts_in, const at::Tensor& slots_in, double eps) {
  check_ifvd_maps_inputs(student_in, teacher_in, student_sums, teacher_sums, counts_in, slots_in, eps);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::Tensor sums_s = student_sums.contiguous(), sums_t = teacher_sums.contiguous();
  const at::Tensor counts = counts_in.contiguous(), slots = slots_in.contiguous();
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), K = sums_s.size(1);
  const int64_t H = student.size(2), W = student.size(3), HW = H * W, BK = B * K;
  const auto acc = student.options().dtype(acc_dtype(student.scalar_type()));
  // every output is written whole by the two launches: no fills
  at::Tensor cos_s = at::empty({B, H, W}, acc), cos_t = at::empty_like(cos_s), fnorm_s = at::empty_like(cos_s);
  at::Tensor fnorm_t = at::empty_like(cos_s), cent_s = at::empty({B, K, Cs}, acc);
  at::Tensor table_s = at::empty({B, Cs, K}, acc), table_t = at::empty({B, Ct, K}, acc);
  at::Tensor norms = at::empty({2, B, K}, acc);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ifvd_maps_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (BK == 0) return;
    acc_t* norms_s = norms.data_ptr<acc_t>();
    const SumsTable<acc_t> table_of_s{sums_s.const_data_ptr<double>(), Cs, table_s.data_ptr<acc_t>(), norms_s,
                                      cent_s.data_ptr<acc_t>()};
    const SumsTable<acc_t> table_of_t{sums_t.const_data_ptr<double>(), Ct, table_t.data_ptr<acc_t>(), norms_s + BK,
                                      nullptr};
    centroid_tables_from_sums_kernel<acc_t><<<blocks_for(2 * BK * 32), kThreads, 0, stream>>>(
        table_of_s, table_of_t, counts.const_data_ptr<int64_t>(), K, BK);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (HW == 0) return;
    CosinePair<scalar_t> pair{{student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>()},
                              {table_s.const_data_ptr<acc_t>(), table_t.const_data_ptr<acc_t>()},
                              {norms_s, norms_s + BK},
                              {cos_s.data_ptr<acc_t>(), cos_t.data_ptr<acc_t>()},
                              {fnorm_s.data_ptr<acc_t>(), fnorm_t.data_ptr<acc_t>()},
                              {Cs, Ct}};
    const dim3 grid(grid_x((HW + kCosinePixels - 1) / kCosinePixels, "student"),
                    static_cast<unsigned>(std::min(B, kMaxGridYZ)), 2);
    cosine_pair_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(pair, slots.const_data_ptr<int16_t>(), B, HW,
                                                                       static_cast<int>(K), static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cos_s, cos_t, fnorm_s, cent_s};
}

}  // namespace

// The CUDA kernel of the schema declared in idd_ops.cpp (other devices: csrc/composite/ifvd_maps.cpp).
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("_ifvd_maps", &ifvd_maps_kernel);
}

}  // namespace idd_ops
