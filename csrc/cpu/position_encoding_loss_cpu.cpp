// MSE between predicted position maps and analytic ones generated on the fly, on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "../common/enums.h"
#include "../common/position.h"

namespace idd_ops {
namespace {

// Row and column factor tables of one map (H + W values instead of H * W).
template <typename acc_t>
void factor_tables(int64_t kind, double param, int64_t H, int64_t W, std::vector<acc_t>& rowf, std::vector<acc_t>& colf) {
  rowf.resize(H);
  colf.resize(W);
  for (int64_t y = 0; y < H; ++y) rowf[y] = position_factor<acc_t>(kind, param, 0, y, H);
  for (int64_t x = 0; x < W; ++x) colf[x] = position_factor<acc_t>(kind, param, 1, x, W);
}

// Calls body(b, m, plane_offset, rowf, colf) for every (image, map) plane in parallel.
template <typename acc_t, typename F>
void for_each_plane(const at::Tensor& pred, at::IntArrayRef kinds, at::ArrayRef<double> params, F body) {
  const int64_t B = pred.size(0), M = pred.size(1), H = pred.size(2), W = pred.size(3);
  at::parallel_for(0, B * M, 1, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> rowf, colf;
    for (int64_t bm = p0; bm < p1; ++bm) {
      // (b, m) is one plane of pred
      const int64_t m = bm % M;
      factor_tables(kinds[m], params[m], H, W, rowf, colf);
      body(bm, bm * H * W, rowf, colf);
    }
  });
}

at::Tensor position_encoding_loss_kernel(const at::Tensor& pred_in, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                         c10::string_view reduction) {
  check_position_encoding_loss_inputs(pred_in, kinds, params);
  const Reduction red = parse_reduction(std::string(reduction));
  const at::Tensor pred = pred_in.contiguous();
  const int64_t B = pred.size(0), M = pred.size(1), H = pred.size(2), W = pred.size(3);
  const auto acc = acc_dtype(pred.scalar_type());
  at::Tensor out = red == Reduction::None ? at::empty_like(pred) : at::zeros({B * M}, pred.options().dtype(acc));
  // no elements: the errors are empty (a null data pointer, which the plane loop below would
  // take for "reduce" and write a plane sum through) and every sum is 0
  if (pred.numel() == 0) return red == Reduction::None ? out : out.sum();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "position_encoding_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = pred.const_data_ptr<scalar_t>();
    scalar_t* errors = red == Reduction::None ? out.data_ptr<scalar_t>() : nullptr;
    acc_t* sums = red == Reduction::None ? nullptr : out.data_ptr<acc_t>();
    for_each_plane<acc_t>(pred, kinds, params, [&](int64_t bm, int64_t off, const std::vector<acc_t>& rowf,
                                                     const std::vector<acc_t>& colf) {
      if (errors) {
        for (int64_t y = 0; y < H; ++y) {
          const scalar_t* __restrict__ row = x + off + y * W;
          scalar_t* __restrict__ err = errors + off + y * W;
          const acc_t ry = rowf[y];
          for (int64_t c = 0; c < W; ++c) {
            const acc_t d = static_cast<acc_t>(row[c]) - ry * colf[c];
            err[c] = static_cast<scalar_t>(d * d);
          }
        }
        return;
      }
      // Eight partial sums per row: one running sum would serialise the loop on the add's
      // latency (no reassociation without fast-math), eight vectorise it.
      acc_t total = 0;
      for (int64_t y = 0; y < H; ++y) {
        const scalar_t* row = x + off + y * W;
        const acc_t ry = rowf[y];
        acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t c = 0;
        for (; c + 8 <= W; c += 8) {
          for (int u = 0; u < 8; ++u) {
            const acc_t d = static_cast<acc_t>(row[c + u]) - ry * colf[c + u];
            part[u] += d * d;
          }
        }
        acc_t rest = 0;
        for (; c < W; ++c) {
          const acc_t d = static_cast<acc_t>(row[c]) - ry * colf[c];
          rest += d * d;
        }
        total += (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))) + rest;
      }
      sums[bm] = total;
    });
  });
  if (red == Reduction::None) return out;
  const at::Tensor total = out.sum();
  // mean/sum stay in the accumulation dtype: a half "sum" would overflow (the caller casts)
  return red == Reduction::Mean ? total / static_cast<double>(std::max<int64_t>(pred.numel(), 1)) : total;
}

// d/d pred of the loss: grad * 2 (pred - G), divided by the element count for "mean";
// `grad` is a scalar for "mean"/"sum" and [B, M, H, W] for "none".
at::Tensor position_encoding_loss_backward_kernel(const at::Tensor& grad_in, const at::Tensor& pred_in,
                                                  at::IntArrayRef kinds, at::ArrayRef<double> params,
                                                  c10::string_view reduction) {
  const Reduction red = parse_reduction(std::string(reduction));
  check_position_encoding_loss_backward_inputs(grad_in, pred_in, kinds, params, red);
  const at::Tensor pred = pred_in.contiguous();
  const int64_t H = pred.size(2), W = pred.size(3);
  const at::Tensor grad = loss_grad_acc(grad_in, pred, red);
  at::Tensor out = at::empty_like(pred);
  if (pred.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "position_encoding_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = pred.const_data_ptr<scalar_t>();
    const acc_t* g = red == Reduction::None ? grad.const_data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t scale = acc_t(2) / (red == Reduction::Mean ? static_cast<acc_t>(std::max<int64_t>(pred.numel(), 1)) : acc_t(1));
    // The scalar gradient is read once: reloading it beside the stores would stop vectorisation.
    const acc_t g0 = red == Reduction::None ? acc_t(0) : grad.const_data_ptr<acc_t>()[0] * scale;
    for_each_plane<acc_t>(pred, kinds, params, [&](int64_t, int64_t off, const std::vector<acc_t>& rowf,
                                                     const std::vector<acc_t>& colf) {
      for (int64_t y = 0; y < H; ++y) {
        const scalar_t* __restrict__ xr = x + off + y * W;
        scalar_t* __restrict__ orow = o + off + y * W;
        const acc_t ry = rowf[y];
        if (red == Reduction::None) {
          const acc_t* __restrict__ gr = g + off + y * W;
          for (int64_t c = 0; c < W; ++c)
            orow[c] = static_cast<scalar_t>(gr[c] * scale * (static_cast<acc_t>(xr[c]) - ry * colf[c]));
        } else {
          for (int64_t c = 0; c < W; ++c) orow[c] = static_cast<scalar_t>(g0 * (static_cast<acc_t>(xr[c]) - ry * colf[c]));
        }
      }
    });
  });
  return out;
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("position_encoding_loss", &position_encoding_loss_kernel);
  m.impl("_position_encoding_loss_backward", &position_encoding_loss_backward_kernel);
}

}  // namespace idd_ops
