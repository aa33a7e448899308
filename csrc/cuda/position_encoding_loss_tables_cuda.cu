// position_encoding_loss on CUDA from per-block column tables, for maps up to
// position_tables_max_width columns wide (wider ones: position_encoding_loss_cuda.cu).
//
// Every map of common/position.h is separable, G[y, x] = rowf(y) * colf(x), and the per-element
// kernel (position_encoding_loss_cuda.cu) forms it as that product: horizontal (colf = x / (W-1),
// rowf = 1), vertical (rowf = y / (H-1)), gaussian (exp(-du^2 / 2s^2) * exp(-dv^2 / 2s^2)),
// horizontal and vertical stripes (an integer floor/mod of y or x alone), sin/cos of u or of v. So
// no map keeps a per-element formula: a block serves one map (blockIdx.y) and a set of rows; it
// fills colf for its map once into shared memory (W values), each thread forms rowf once per row
// and then walks the batch at each (row, column pack) with 16-byte loads. Per element: one shared-
// memory read and a multiply, no division, modulo or transcendental; the factors are those of
// position_factor, multiplied in the same order, so the targets equal the per-element kernel's.
// Launches: forward "mean"/"sum" 2 (the kernel writes one partial per block; a one-block finalise
// sums them in a fixed order: deterministic, no atomics, no zero fill; 1 under IDD_OPS_CUDA_NEXT,
// where the forward's last block does it: position_tables_forward_sum), "none" 1; backward 1 (the
// per-element path: forward 3-4 with a zero fill, a sum and a division; backward 1).
//
// Bytes and predicted H200 time (4.8 TB/s datasheet), float32, B=8, M=5 (benchmarks/cases.py):
//   512x1024: forward reads pred 83.9 MB: 0.017 ms; backward reads pred, writes the gradient
//     167.8 MB: 0.035 ms. 64x128: 1.3 MB: launch-bound (a few us per launch).
#include <ATen/OpMathType.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "../common/enums.h"
#include "../common/position.h"
#include "grid_tickets.cuh"
#include "position_tables.cuh"
#include "position_specs.cuh"
#include "vectorized.cuh"

namespace idd_ops {
namespace {

// Images whose packs at one (row, column pack) a thread loads together.
constexpr int kImagesAhead = 4;

// Walks the block's share of pred [B, M, H, W] (block (tx, ty): tx threads along a row's packs,
// ty rows; grid (row blocks, M)): fills the column table of map m = blockIdx.y in shared
// memory, forms each row's factor once, and calls visit(offset, pack of pred, targets) at
// every (row, column pack) for each image b. Every thread of the block must call it.
template <typename scalar_t, int VEC, typename Visit>
__device__ __forceinline__ void visit_packs(const scalar_t* __restrict__ pred, const MapSpecs& maps, int64_t B,
                                            int64_t M, int64_t H, int64_t W, Visit&& visit) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char table_bytes[];
  acc_t* colf = reinterpret_cast<acc_t*>(table_bytes);
  const int64_t m = blockIdx.y, kind = maps.kind[m];
  const double param = maps.param[m];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t x = tid; x < W; x += kThreads) colf[x] = position_factor<acc_t>(kind, param, 1, x, W);
  __syncthreads();
  const int64_t packs = W / VEC, image = M * H * W;
  for (int64_t y = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; y < H;
       y += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const acc_t rowf = position_factor<acc_t>(kind, param, 0, y, H);
    const int64_t row = (m * H + y) * W;  // offset of (b = 0, m, y, 0)
    for (int64_t xv = threadIdx.x; xv < packs; xv += blockDim.x) {
      // the pack's column factors by 16-byte shared loads: read one element at a time, the
      // lanes (VEC words apart) would meet in a fraction of the banks (float32: a quarter, four
      // passes a read); bfloat16/half packs of 8 still take twice the least passes
      constexpr int P = pack_size<acc_t>() < VEC ? pack_size<acc_t>() : VEC;
      acc_t target[VEC];
#pragma unroll
      for (int j0 = 0; j0 < VEC; j0 += P) {
        const Pack<acc_t, P> f = load_pack<P>(colf + xv * VEC + j0);
#pragma unroll
        for (int j = 0; j < P; ++j) target[j0 + j] = rowf * f.v[j];
      }
      // the packs of kImagesAhead images loaded before any is visited: a visit that stores
      // (the backward) kept nvcc from issuing the next image's load before it
      for (int64_t b0 = 0; b0 < B; b0 += kImagesAhead) {
        Pack<scalar_t, VEC> x[kImagesAhead];
#pragma unroll
        for (int u = 0; u < kImagesAhead; ++u)
          if (b0 + u < B) x[u] = load_pack<VEC>(pred + (b0 + u) * image + row + xv * VEC);
#pragma unroll
        for (int u = 0; u < kImagesAhead; ++u)
          if (b0 + u < B) visit((b0 + u) * image + row + xv * VEC, x[u], target);
      }
    }
  }
}

// The block's part of the forward: its sum of squared errors (valid in its first thread), or
// for reduction "none" the elementwise errors (and 0).
template <typename scalar_t, int VEC, bool ELEMENTWISE>
__device__ __forceinline__ at::opmath_type<scalar_t> forward_part(const scalar_t* __restrict__ pred,
                                                                  const MapSpecs& maps, int64_t B, int64_t M,
                                                                  int64_t H, int64_t W,
                                                                  scalar_t* __restrict__ errors) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t sum = 0;
  visit_packs<scalar_t, VEC>(pred, maps, B, M, H, W,
                             [&](int64_t offset, const Pack<scalar_t, VEC>& x, const acc_t(&target)[VEC]) {
                               [[maybe_unused]] Pack<scalar_t, VEC> e;
#pragma unroll
                               for (int j = 0; j < VEC; ++j) {
                                 const acc_t d = static_cast<acc_t>(x.v[j]) - target[j];
                                 if constexpr (ELEMENTWISE)
                                   e.v[j] = static_cast<scalar_t>(d * d);
                                 else
                                   sum += d * d;
                               }
                               if constexpr (ELEMENTWISE) store_pack(errors + offset, e);
                             });
  if constexpr (ELEMENTWISE) return acc_t(0);
  else return block_sum_any_shape(sum);
}

// Per-block partial sums of squared errors (reduced by position_tables_finalize), or for
// reduction "none" the elementwise errors.
template <typename scalar_t, int VEC, bool ELEMENTWISE>
__global__ void __launch_bounds__(kThreads)
    position_tables_forward(const scalar_t* __restrict__ pred, MapSpecs maps, int64_t B, int64_t M, int64_t H,
                            int64_t W, at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ errors) {
  const auto block_total = forward_part<scalar_t, VEC, ELEMENTWISE>(pred, maps, B, M, H, W, errors);
  if constexpr (!ELEMENTWISE) {
    if (threadIdx.x == 0 && threadIdx.y == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = block_total;
  }
}

// out = (sum of the n partials) / divisor, summed in a fixed order: thread tid (of `threads`, the
// block's linear index) adds partials tid, tid + threads, ..., then the block adds the threads'.
// Every thread must call it, after a barrier past any earlier block_sum_any_shape (whose shared
// slots it reuses).
template <typename acc_t>
__device__ __forceinline__ void finish_partials(const acc_t* __restrict__ partial, int64_t n, acc_t divisor,
                                                acc_t* __restrict__ out, unsigned tid, unsigned threads) {
  acc_t sum = 0;
  for (int64_t i = tid; i < n; i += threads) sum += partial[i];
  sum = block_sum_any_shape(sum);
  if (tid == 0) out[0] = sum / divisor;
}

// out = (sum of the n partials) / divisor, summed in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    position_tables_finalize(const acc_t* __restrict__ partial, int64_t n, acc_t divisor, acc_t* __restrict__ out) {
  finish_partials(partial, n, divisor, out, threadIdx.x, kThreads);
}

// IDD_OPS_CUDA_NEXT ("mean" and "sum"): position_tables_forward whose last block to finish
// (counter: grid_tickets.cuh) adds the partials in order into out, where position_tables_finalize
// took a second launch: the same bits.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    position_tables_forward_sum(const scalar_t* __restrict__ pred, MapSpecs maps, int64_t B, int64_t M, int64_t H,
                                int64_t W, at::opmath_type<scalar_t>* __restrict__ partial,
                                at::opmath_type<scalar_t> divisor, at::opmath_type<scalar_t>* __restrict__ out,
                                unsigned* __restrict__ counter) {
  __shared__ bool last;
  const auto block_total = forward_part<scalar_t, VEC, false>(pred, maps, B, M, H, W, nullptr);
  if (threadIdx.x == 0 && threadIdx.y == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = block_total;
  const unsigned blocks = gridDim.x * gridDim.y;
  if (last_to_arrive(counter, blocks, &last))
    finish_partials(partial, blocks, divisor, out, threadIdx.x + blockDim.x * threadIdx.y, blockDim.x * blockDim.y);
}

// d loss / d pred = grad * scale * (pred - target); grad one value, or per element ("none").
template <typename scalar_t, int VEC, bool ELEMENTWISE>
__global__ void __launch_bounds__(kThreads)
    position_tables_backward(const at::opmath_type<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ pred,
                             MapSpecs maps, int64_t B, int64_t M, int64_t H, int64_t W, at::opmath_type<scalar_t> scale,
                             scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t g_scaled = ELEMENTWISE ? acc_t(0) : grad[0] * scale;
  visit_packs<scalar_t, VEC>(pred, maps, B, M, H, W,
                             [&](int64_t offset, const Pack<scalar_t, VEC>& x, const acc_t(&target)[VEC]) {
                               Pack<scalar_t, VEC> r;
#pragma unroll
                               for (int j = 0; j < VEC; ++j) {
                                 const acc_t g = ELEMENTWISE ? grad[offset + j] * scale : g_scaled;
                                 r.v[j] = static_cast<scalar_t>(g * (static_cast<acc_t>(x.v[j]) - target[j]));
                               }
                               store_pack(out + offset, r);
                             });
}

// ---- host side -----------------------------------------------------------------------------

struct Launch {
  dim3 grid, block;
  size_t table_bytes;
};

// Threads along a row: the packs of a row, rounded up to a power of two in [32, kThreads]; the
// rest of the block takes further rows. Row blocks: about one full wave of the GPU over the M
// maps (each block fills a W-entry table, so fewer, longer-lived blocks amortise it).
Launch launch_shape(int64_t M, int64_t H, int64_t W, int64_t packs, size_t acc_bytes) {
  int tx = 32;
  while (tx < packs && tx < kThreads) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t row_blocks = (H + ty - 1) / ty;
  const int64_t wave = std::max<int64_t>(1, 8 * static_cast<int64_t>(sm_count()) / M);
  TORCH_CHECK(M <= kMaxGridYZ, "position_encoding_loss: ", M, " maps are too many for one grid");
  return {dim3(static_cast<unsigned int>(std::min(row_blocks, wave)), static_cast<unsigned int>(M)),
          dim3(tx, ty), static_cast<size_t>(W) * acc_bytes};
}

template <typename scalar_t>
bool use_packs(int64_t W, std::initializer_list<const void*> pointers) {
  constexpr int V = pack_size<scalar_t>();
  if (W % V != 0) return false;
  for (const void* p : pointers)
    if (!aligned_for(p, V, sizeof(scalar_t))) return false;
  return true;
}

template <typename scalar_t, int VEC>
void launch_forward(const scalar_t* pred, const MapSpecs& maps, int64_t B, int64_t M, int64_t H, int64_t W,
                    at::opmath_type<scalar_t>* partial, scalar_t* errors, const Launch& l, cudaStream_t stream) {
  if (errors != nullptr)
    position_tables_forward<scalar_t, VEC, true>
        <<<l.grid, l.block, l.table_bytes, stream>>>(pred, maps, B, M, H, W, partial, errors);
  else
    position_tables_forward<scalar_t, VEC, false>
        <<<l.grid, l.block, l.table_bytes, stream>>>(pred, maps, B, M, H, W, partial, errors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_backward(const at::opmath_type<scalar_t>* grad, bool elementwise, const scalar_t* pred,
                     const MapSpecs& maps, int64_t B, int64_t M, int64_t H, int64_t W,
                     at::opmath_type<scalar_t> scale, scalar_t* out, const Launch& l, cudaStream_t stream) {
  if (elementwise)
    position_tables_backward<scalar_t, VEC, true>
        <<<l.grid, l.block, l.table_bytes, stream>>>(grad, pred, maps, B, M, H, W, scale, out);
  else
    position_tables_backward<scalar_t, VEC, false>
        <<<l.grid, l.block, l.table_bytes, stream>>>(grad, pred, maps, B, M, H, W, scale, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t position_tables_max_width(at::ScalarType dtype) {
  // the column table in the default 48 KiB of shared memory, less 1 KiB for the kernels' static
  // shared memory (block sums)
  return static_cast<int64_t>((48 * 1024 - 1024) / (acc_dtype(dtype) == at::kDouble ? sizeof(double) : sizeof(float)));
}

// The callers route wider maps to the per-element kernel; a direct call gets this error.
void check_table_width(const at::Tensor& pred) {
  TORCH_CHECK(pred.size(3) <= position_tables_max_width(pred.scalar_type()), "position_encoding_loss: width ",
              pred.size(3), " exceeds the column table");
}

at::Tensor position_encoding_loss_tables(const at::Tensor& pred_in, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                         c10::string_view reduction) {
  const MapSpecs maps = map_specs(kinds, params);
  const Reduction red = parse_reduction(std::string(reduction));
  check_table_width(pred_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const int64_t total = pred.numel(), B = pred.size(0), M = pred.size(1), H = pred.size(2), W = pred.size(3);
  const auto acc = acc_dtype(pred.scalar_type());
  at::Tensor errors = red == Reduction::None ? at::empty_like(pred) : at::Tensor();
  if (total == 0) return red == Reduction::None ? errors : at::zeros({}, pred.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "position_loss_tables_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = pack_size<scalar_t>();
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    scalar_t* e = errors.defined() ? errors.data_ptr<scalar_t>() : nullptr;
    const bool packed = use_packs<scalar_t>(W, {p, e == nullptr ? p : e});
    const Launch l = launch_shape(M, H, W, packed ? W / V : W, sizeof(acc_t));
    at::Tensor partial;
    if (e == nullptr) partial = at::empty({static_cast<int64_t>(l.grid.x) * l.grid.y}, pred.options().dtype(acc));
    acc_t* part = e == nullptr ? partial.data_ptr<acc_t>() : nullptr;
    // mean/sum stay in the accumulation dtype: a half "sum" would overflow (the caller casts)
    const acc_t divisor = red == Reduction::Mean ? static_cast<acc_t>(total) : acc_t(1);
    if (e == nullptr && cuda_next_enabled(NextGroup::position)) {  // the forward's last block adds the partials
      at::Tensor out = at::empty({}, pred.options().dtype(acc));
      const at::Tensor counters = grid_ticket_counters(pred.device(), 1);
      auto* counter = reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int>());
      if (packed)
        position_tables_forward_sum<scalar_t, V><<<l.grid, l.block, l.table_bytes, stream>>>(
            p, maps, B, M, H, W, part, divisor, out.data_ptr<acc_t>(), counter);
      else
        position_tables_forward_sum<scalar_t, 1><<<l.grid, l.block, l.table_bytes, stream>>>(
            p, maps, B, M, H, W, part, divisor, out.data_ptr<acc_t>(), counter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      errors = out;
      return;
    }
    if (packed)
      launch_forward<scalar_t, V>(p, maps, B, M, H, W, part, e, l, stream);
    else
      launch_forward<scalar_t, 1>(p, maps, B, M, H, W, part, e, l, stream);
    if (e == nullptr) {
      at::Tensor out = at::empty({}, pred.options().dtype(acc));
      position_tables_finalize<acc_t>
          <<<1, kThreads, 0, stream>>>(part, partial.numel(), divisor, out.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      errors = out;
    }
  });
  return errors;
}

at::Tensor position_encoding_loss_backward_tables(const at::Tensor& grad_in, const at::Tensor& pred_in,
                                                  at::IntArrayRef kinds, at::ArrayRef<double> params,
                                                  c10::string_view reduction) {
  const MapSpecs maps = map_specs(kinds, params);
  const Reduction red = parse_reduction(std::string(reduction));
  check_table_width(pred_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor grad = loss_grad_acc(grad_in, pred, red);
  const int64_t total = pred.numel(), B = pred.size(0), M = pred.size(1), H = pred.size(2), W = pred.size(3);
  at::Tensor out = at::empty_like(pred);
  if (total == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "position_loss_bwd_tables_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = pack_size<scalar_t>();
    const acc_t scale = acc_t(2) / (red == Reduction::Mean ? static_cast<acc_t>(total) : acc_t(1));
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool packed = use_packs<scalar_t>(W, {p, o});
    const Launch l = launch_shape(M, H, W, packed ? W / V : W, sizeof(acc_t));
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const bool elementwise = red == Reduction::None;
    if (packed)
      launch_backward<scalar_t, V>(g, elementwise, p, maps, B, M, H, W, scale, o, l, stream);
    else
      launch_backward<scalar_t, 1>(g, elementwise, p, maps, B, M, H, W, scale, o, l, stream);
  });
  return out;
}

}  // namespace idd_ops
