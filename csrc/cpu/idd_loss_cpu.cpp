// The inter-class distance loss between a student's and a teacher's distance matrices, on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/idd_loss.h"

namespace idd_ops {
namespace {

// Per-image sum of (Ds - Dt)^2 over valid pairs and the number of valid pairs.
std::tuple<at::Tensor, at::Tensor> idd_pair_sums(const at::Tensor& ds, const at::Tensor& dt, const at::Tensor& cs,
                                                 const at::Tensor& ct) {
  const int64_t B = ds.size(0), K = ds.size(1);
  at::Tensor sums = at::empty({B}, ds.options());
  at::Tensor n_valid = at::empty({B}, cs.options());
  AT_DISPATCH_FLOATING_TYPES(ds.scalar_type(), "idd_loss_cpu", [&] {
    const scalar_t* s = ds.const_data_ptr<scalar_t>();
    const scalar_t* t = dt.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t acc = 0;
        int64_t n = 0;
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = i + 1; j < K; ++j)
            if (idd_pair_valid(cs.const_data_ptr<int64_t>() + b * K, ct.const_data_ptr<int64_t>() + b * K, i, j)) {
              const scalar_t d = s[(b * K + i) * K + j] - t[(b * K + i) * K + j];
              acc += d * d;
              ++n;
            }
        sums.data_ptr<scalar_t>()[b] = acc;
        n_valid.data_ptr<int64_t>()[b] = n;
      }
    });
  });
  return {sums, n_valid};
}

at::Tensor idd_loss_kernel(const at::Tensor& student_dist, const at::Tensor& teacher_dist,
                           const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                           c10::string_view reduction) {
  const Reduction red = parse_reduction(std::string(reduction));
  const at::Tensor ds = student_dist.contiguous();
  auto [sums, n_valid] = idd_pair_sums(ds, teacher_dist.to(ds.scalar_type()).contiguous(),
                                       student_counts.contiguous(), teacher_counts.contiguous());
  return idd_reduce(sums, n_valid, red);
}

// grad_Ds[b, i, j] = scale[b] * 2 (Ds - Dt) on valid pairs i < j, 0 elsewhere.
at::Tensor idd_loss_backward_kernel(const at::Tensor& grad, const at::Tensor& student_dist,
                                    const at::Tensor& teacher_dist, const at::Tensor& student_counts,
                                    const at::Tensor& teacher_counts, c10::string_view reduction) {
  const Reduction red = parse_reduction(std::string(reduction));
  const at::Tensor ds = student_dist.contiguous();
  const at::Tensor dt = teacher_dist.to(ds.scalar_type()).contiguous();
  const at::Tensor cs = student_counts.contiguous(), ct = teacher_counts.contiguous();
  const int64_t B = ds.size(0), K = ds.size(1);
  auto n_valid = std::get<1>(idd_pair_sums(ds, dt, cs, ct));
  const at::Tensor scale = idd_image_scale(grad.to(ds.scalar_type()), n_valid, red, B);
  at::Tensor out = at::zeros_like(ds);
  AT_DISPATCH_FLOATING_TYPES(ds.scalar_type(), "idd_loss_backward_cpu", [&] {
    const scalar_t* s = ds.const_data_ptr<scalar_t>();
    const scalar_t* t = dt.const_data_ptr<scalar_t>();
    const scalar_t* sc = scale.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = i + 1; j < K; ++j)
          if (idd_pair_valid(cs.const_data_ptr<int64_t>() + b * K, ct.const_data_ptr<int64_t>() + b * K, i, j)) {
            const int64_t e = (b * K + i) * K + j;
            o[e] = sc[b] * scalar_t(2) * (s[e] - t[e]);
          }
  });
  return out;
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("idd_loss", &idd_loss_kernel);
  m.impl("_idd_loss_backward", &idd_loss_backward_kernel);
}

}  // namespace idd_ops
