// Gradient of class_sums on CUDA: grad_feats[b, c, p] = grad_sums[b, slot_p, c], 0 where
// slot_p = -1. A pure gather with one streaming write: VEC outputs (16 bytes) per thread where
// the layout allows, 32-bit index math unless a tensor passes 2^31 elements. The gradient of the
// float64 sums is read as it comes (a [B, K, C] table that stays in cache) and converted in the
// kernel (half/bfloat16 through float, as before), so no launch converts it first. NCHW takes a
// block per row with the row's table in shared memory where it fits (the rows kernel), else a
// per-pixel gather from the table; channels_last reads a pixel's C contiguous entries.
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

// IDD_OPS_FORCE_INDEX64=1 takes the 64-bit index path at any size (read on every call, so a
// test can set it for one call); private: for the tests only.
bool force_index64() { return env_flag("IDD_OPS_FORCE_INDEX64"); }

// NCHW output: thread i writes pixels [VEC i, VEC i + VEC) of one (b, c) row (HW % VEC == 0).
template <typename scalar_t, int VEC, typename index_t>
__global__ void class_sums_backward_nchw_kernel(const double* __restrict__ grad_sums,
                                                const int16_t* __restrict__ slots, index_t K, index_t C, index_t HW,
                                                index_t vectors, scalar_t* __restrict__ grad) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    // (b, c, p .. p + VEC - 1) are VEC elements of the output
    const index_t e = i * VEC, row = e / HW, p = e - row * HW, b = row / C, c = row - b * C;
    const Vec<int16_t, VEC> s = load_vec<int16_t, VEC>(slots + b * HW + p);
    const double* g = grad_sums + b * K * C + c;
    Vec<scalar_t, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      CUDA_KERNEL_ASSERT(s.v[j] >= -1 && s.v[j] < K && "slots: a value is outside [-1, num_classes)");
      out.v[j] = s.v[j] >= 0 ? static_cast<scalar_t>(g[s.v[j] * C]) : scalar_t(0);
    }
    store_vec<scalar_t, VEC>(grad + e, out);
  }
}

// Most bytes of one (b, c) row's class table a rows-kernel block stages in shared memory: the
// default limit, no opt-in; past it (K above 12288 float32 outputs) the gather kernel above runs.
constexpr int64_t kRowTableBytes = 48 * 1024;

// NCHW output, one block per (b, c) row (grid-strided): the row's K table entries, converted to
// the output dtype once, go to shared memory, then the block writes the row in VEC-pixel stores.
// The gather kernel above reads grad_sums[b, slot, c] per pixel from a table whose classes lie C
// doubles apart: with fragmented labels a warp's lanes touch up to 32 sectors a load (the
// emulated traffic: 2.4x the sectors of street labels, 5x the bytes written), where here the
// table is K scattered loads per row and the pixels' reads are shared-memory words (distinct
// banks for K <= 32 in float32).
template <typename scalar_t, int VEC, typename index_t>
__global__ void class_sums_backward_rows_kernel(const double* __restrict__ grad_sums,
                                                const int16_t* __restrict__ slots, int64_t K, int64_t C,
                                                index_t HW, int64_t rows, scalar_t* __restrict__ grad) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  scalar_t* table = reinterpret_cast<scalar_t*>(smem_bytes);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / C, c = row - b * C;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      table[k] = static_cast<scalar_t>(grad_sums[(b * K + k) * C + c]);
    __syncthreads();
    const int16_t* s_row = slots + b * HW;
    scalar_t* out_row = grad + row * HW;
    for (index_t p = threadIdx.x * static_cast<index_t>(VEC); p < HW; p += static_cast<index_t>(blockDim.x) * VEC) {
      const Vec<int16_t, VEC> s = load_vec<int16_t, VEC>(s_row + p);
      Vec<scalar_t, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        CUDA_KERNEL_ASSERT(s.v[j] >= -1 && s.v[j] < K && "slots: a value is outside [-1, num_classes)");
        out.v[j] = s.v[j] >= 0 ? table[s.v[j]] : scalar_t(0);
      }
      store_vec<scalar_t, VEC>(out_row + p, out);
    }
    __syncthreads();  // the next row overwrites the table
  }
}

// channels_last output: thread i writes channels [c, c + VEC) of one pixel (C % VEC == 0).
template <typename scalar_t, int VEC, typename index_t>
__global__ void class_sums_backward_last_kernel(const double* __restrict__ grad_sums,
                                                const int16_t* __restrict__ slots, index_t K, index_t C, index_t HW,
                                                index_t vectors, scalar_t* __restrict__ grad) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    // (b, p, c .. c + VEC - 1) are VEC elements of the output
    const index_t e = i * VEC, pixel = e / C, c = e - pixel * C, b = pixel / HW;
    const index_t k = slots[pixel];
    CUDA_KERNEL_ASSERT(k >= -1 && k < K && "slots: a value is outside [-1, num_classes)");
    Vec<scalar_t, VEC> out;
    if (k >= 0) {
      const double* g = grad_sums + (b * K + k) * C + c;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(g[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = scalar_t(0);
    }
    store_vec<scalar_t, VEC>(grad + e, out);
  }
}

template <typename scalar_t, int VEC, typename index_t>
void launch_backward(bool last, const at::Tensor& grad_sums, const at::Tensor& slots, at::Tensor& grad) {
  const index_t K = grad_sums.size(1), C = grad_sums.size(2), HW = slots.size(1) * slots.size(2);
  const index_t vectors = grad.numel() / VEC;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t table_bytes = static_cast<int64_t>(K) * static_cast<int64_t>(sizeof(scalar_t));
  if (!last && table_bytes <= kRowTableBytes) {
    // threads for one row's vectors, in whole warps (small maps leave no block mostly idle)
    const int64_t rows = grad.numel() / HW, row_vectors = HW / VEC;
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, (row_vectors + 31) / 32 * 32));
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(rows, std::numeric_limits<int>::max()));
    class_sums_backward_rows_kernel<scalar_t, VEC, index_t><<<blocks, threads, table_bytes, stream>>>(
        grad_sums.const_data_ptr<double>(), slots.const_data_ptr<int16_t>(), K, C, HW, rows,
        grad.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto kernel = last ? class_sums_backward_last_kernel<scalar_t, VEC, index_t>
                     : class_sums_backward_nchw_kernel<scalar_t, VEC, index_t>;
  kernel<<<blocks_for(vectors), kThreads, 0, stream>>>(grad_sums.const_data_ptr<double>(),
                                                       slots.const_data_ptr<int16_t>(), K, C, HW, vectors,
                                                       grad.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor class_sums_backward_kernel(const at::Tensor& grad_sums_in, const at::Tensor& slots_in, at::ScalarType dtype,
                                      bool channels_last) {
  check_class_sums_backward_inputs(grad_sums_in, slots_in, dtype);
  const c10::cuda::CUDAGuard guard(grad_sums_in.device());
  const at::Tensor grad_sums = grad_sums_in.to(at::kDouble).contiguous();  // a no-op from autograd
  at::Tensor slots = slots_in.contiguous();
  if (!aligned16(slots.const_data_ptr())) slots = slots.clone();
  const int64_t B = grad_sums.size(0), C = grad_sums.size(2), H = slots.size(1), W = slots.size(2);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor grad = at::empty({B, C, H, W}, grad_sums.options().dtype(dtype).memory_format(format));
  if (grad.numel() == 0) return grad;
  // 32-bit indices while a grid-stride step (up to 65535 x kThreads) cannot wrap past 2^31
  const int64_t limit = (int64_t{1} << 31) - int64_t{65535} * kThreads;
  const bool wide = force_index64() || grad.numel() >= limit || grad_sums.numel() >= limit || slots.numel() >= limit;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_sums_backward_cuda", [&] {
    constexpr int kVec = vec16<scalar_t>();
    // a vector never crosses a row (NCHW: HW values, channels_last: C values)
    const bool vec = (channels_last ? C : H * W) % kVec == 0 && aligned16(grad.data_ptr());
    if (wide) {
      if (vec) launch_backward<scalar_t, kVec, int64_t>(channels_last, grad_sums, slots, grad);
      else launch_backward<scalar_t, 1, int64_t>(channels_last, grad_sums, slots, grad);
    } else {
      if (vec) launch_backward<scalar_t, kVec, int32_t>(channels_last, grad_sums, slots, grad);
      else launch_backward<scalar_t, 1, int32_t>(channels_last, grad_sums, slots, grad);
    }
  });
  return grad;
}

}  // namespace

// CUDA implementation of the schema declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) { m.impl("_class_sums_backward", &class_sums_backward_kernel); }

}  // namespace idd_ops
