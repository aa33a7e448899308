// Kernels with the faults the emulator must catch or expose (tests/test_cuda_emulated.py), and
// correct ones (a reduction, and kernels of known memory traffic and races for the memory model,
// tests/test_cuda_emulated_memory.py): each a case of torch.ops.idd_ops_emu._emu_selftest(name, x). Written
// as CUDA and translated like the library's sources, so they also say what the translation
// handles. x: float32 [n], n <= 256.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <string>

#include "cuda/cuda_utils.cuh"  // the translated copy beside this file's (build/cuda_emu/src)
#include "cuda/grid_tickets.cuh"

namespace emu_selftest {

constexpr int kBlock = 256;

// A block sum by shuffles and a shared array, correctly synchronised.
__global__ void block_sum(const float* x, int n, float* out) {
  __shared__ float warp_totals[kBlock / 32];
  float v = threadIdx.x < n ? x[threadIdx.x] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kBlock / 32; ++w) total += warp_totals[w];
    *out = total;
  }
}

// Reads a neighbour's shared slot without the barrier between the write and the read.
__global__ void missing_barrier(const float* x, int n, float* out) {
  __shared__ float slots[kBlock];
  slots[threadIdx.x] = threadIdx.x < n ? x[threadIdx.x] : 0.f;
  out[threadIdx.x] = slots[(threadIdx.x + 1) % kBlock];
}

// Reads shared memory no thread wrote.
__global__ void unwritten_shared(const float*, int, float* out) {
  extern __shared__ float scratch[];
  out[threadIdx.x] = scratch[threadIdx.x];
}

// Half of each warp waits at __syncthreads, the other half at a full-warp shuffle that needs the
// first half: a hang on a GPU.
__global__ void divergent_barrier(const float* x, int, float* out) {
  float v = x[threadIdx.x];
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// The upper half of each warp exits; the lower half then reads it by a shuffle.
__global__ void shuffle_from_exited_lane(const float* x, int, float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 16);
}

__global__ void failing_assert(const float* x, int, float*) {
  CUDA_KERNEL_ASSERT(x[threadIdx.x] < 0 && "x: expected negative values");
}

// For the memory model (memory_model.h). A warp copies 32 consecutive floats: one 128-byte
// request of 4 sectors per warp, each way.
__global__ void coalesced_copy(const float* x, int, float* out) { out[threadIdx.x] = x[threadIdx.x]; }

// Lanes read floats 32 bytes apart: every lane its own sector, 32 per request.
__global__ void strided_read(const float* x, int, float* out) {
  out[threadIdx.x] = x[threadIdx.x * 8 % kBlock];
}

// A warp writes a column of a 32 x 32 shared array (every lane in bank `warp`: 32 passes), then
// reads a row (one pass).
__global__ void bank_conflicts(const float* x, int, float* out) {
  __shared__ float tile[32 * 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  tile[lane * 32 + warp] = x[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

// 16-byte shared reads whose quarter warps each put their 8 lanes 128 bytes apart (banks 4q to
// 4q + 3 for all 8): a GPU serves a quarter warp per pass, so 8 passes each, 32 for the warp's
// 512 bytes, where 4 would do. The fill before it is 4 conflict-free stores a thread.
__global__ void vector_bank_conflicts(const float* x, int, float* out) {
  __shared__ __align__(16) float tile[32 * 32];
  for (int i = threadIdx.x; i < 32 * 32; i += blockDim.x) tile[i] = x[i % kBlock];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const idd_ops::Vec<float, 4> v = idd_ops::load_vec<float, 4>(tile + (lane % 8) * 32 + (lane / 8) * 4);
  out[threadIdx.x] = v.v[0] + v.v[3];
}

// 32 KiB of static shared memory beside the launch's dynamic buffer: with 20 KiB of the latter,
// past the 48 KiB a block may use without opting in (kOptIn: the host opts in first, which
// allows it). Two kernels, since an opt-in stays with the kernel.
template <bool kOptIn>
__global__ void static_and_dynamic_shared(const float* x, int n, float* out) {
  __shared__ float big[8192];
  extern __shared__ float scratch[];
  big[threadIdx.x] = threadIdx.x < n ? x[threadIdx.x] : 0.f;
  scratch[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x] + scratch[threadIdx.x];
}

// Every block's thread 0 stores its index in out[0]: which one lands depends on the order.
__global__ void blocks_write_one_element(const float*, int, float* out) {
  if (threadIdx.x == 0) out[0] = static_cast<float>(blockIdx.x);
}

// Every block adds into out[0] atomically: correct in any order.
__global__ void blocks_add_atomically(const float* x, int, float* out) {
  if (threadIdx.x == 0) atomicAdd(out, x[blockIdx.x]);
}

// Every block adds into out[0], then reads it back: a partial sum that depends on the order.
__global__ void blocks_read_partial_sum(const float* x, int, float* out) {
  if (threadIdx.x == 0) {
    atomicAdd(out, x[blockIdx.x]);
    out[1 + blockIdx.x] = out[0];
  }
}

// Every block stores its element, then the last block to take a ticket adds them all: ordered
// where the writers fence before their ticket and the last block fences after its own (the
// pattern of cuda/grid_tickets.cuh), a race where either fence is missing.
template <bool kWriterFence, bool kReaderFence>
__global__ void last_block_sums(const float* x, int, float* out, unsigned* ticket) {
  __shared__ bool last;
  if (threadIdx.x == 0) out[1 + blockIdx.x] = x[blockIdx.x];
  if (kWriterFence) __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    if (last && kReaderFence) __threadfence();
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    float total = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) total += out[1 + b];
    out[0] = total;
  }
}

// The library's last_to_arrive in blocks of 32 x 8 threads: one ticket a block (its first
// thread's), so the last block's sum holds every block's element.
__global__ void last_block_sums_2d(const float* x, int, float* out, unsigned* ticket) {
  __shared__ bool last;
  if (threadIdx.x == 0 && threadIdx.y == 0) out[1 + blockIdx.x] = x[blockIdx.x];
  if (idd_ops::last_to_arrive(ticket, gridDim.x, &last) && threadIdx.x == 0 && threadIdx.y == 0) {
    float total = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) total += out[1 + b];
    out[0] = total;
  }
}

// Thread i reads x[i + shift]: with shift 1 the last thread reads one element past x's end,
// with shift -1 the first one element before its start.
template <int kShift>
__global__ void shifted_read(const float* x, int n, float* out) {
  if (threadIdx.x < n) out[threadIdx.x] = x[static_cast<int>(threadIdx.x) + kShift];
}

at::Tensor selftest(const std::string& name, const at::Tensor& x_in) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int n = static_cast<int>(x.numel());
  TORCH_CHECK(n <= kBlock, "x: at most ", kBlock, " values");
  at::Tensor out = at::full({kBlock}, -7.f, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (name == "block_sum") block_sum<<<1, kBlock>>>(xp, n, op);
  else if (name == "missing_barrier") missing_barrier<<<1, kBlock>>>(xp, n, op);
  else if (name == "unwritten_shared") unwritten_shared<<<1, kBlock, kBlock * sizeof(float)>>>(xp, n, op);
  else if (name == "divergent_barrier") divergent_barrier<<<1, kBlock>>>(xp, n, op);
  else if (name == "shuffle_from_exited_lane") shuffle_from_exited_lane<<<1, kBlock>>>(xp, n, op);
  else if (name == "failing_assert") failing_assert<<<1, kBlock>>>(xp, n, op);
  else if (name == "coalesced_copy") coalesced_copy<<<1, kBlock>>>(xp, n, op);
  else if (name == "strided_read") strided_read<<<1, kBlock>>>(xp, n, op);
  else if (name == "bank_conflicts") bank_conflicts<<<1, kBlock>>>(xp, n, op);
  else if (name == "vector_bank_conflicts") vector_bank_conflicts<<<1, kBlock>>>(xp, n, op);
  else if (name == "blocks_write_one_element") blocks_write_one_element<<<4, kBlock>>>(xp, n, op);
  else if (name == "blocks_add_atomically") blocks_add_atomically<<<4, kBlock>>>(xp, n, op);
  else if (name == "blocks_read_partial_sum") blocks_read_partial_sum<<<4, kBlock>>>(xp, n, op);
  else if (name.rfind("last_block_sums", 0) == 0) {
    at::Tensor ticket = at::zeros({1}, x.options().dtype(at::kInt));
    auto* t = reinterpret_cast<unsigned*>(ticket.data_ptr<int>());
    if (name == "last_block_sums") last_block_sums<true, true><<<4, kBlock>>>(xp, n, op, t);
    else if (name == "last_block_sums_2d") last_block_sums_2d<<<4, dim3(32, kBlock / 32)>>>(xp, n, op, t);
    else if (name == "last_block_sums_unfenced_writers") last_block_sums<false, true><<<4, kBlock>>>(xp, n, op, t);
    else last_block_sums<true, false><<<4, kBlock>>>(xp, n, op, t);
  }
  else if (name == "read_past_the_end") shifted_read<1><<<1, kBlock>>>(xp, n, op);
  else if (name == "read_before_the_start") shifted_read<-1><<<1, kBlock>>>(xp, n, op);
  else if (name == "too_many_threads") block_sum<<<1, 2048>>>(xp, n, op);
  else if (name == "too_much_shared") unwritten_shared<<<1, kBlock, 64 * 1024>>>(xp, n, op);
  else if (name == "static_and_dynamic_shared") static_and_dynamic_shared<false><<<1, kBlock, 20 * 1024>>>(xp, n, op);
  else if (name == "static_and_dynamic_shared_opted_in") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(static_and_dynamic_shared<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        20 * 1024));
    static_and_dynamic_shared<true><<<1, kBlock, 20 * 1024>>>(xp, n, op);
  }
  else TORCH_CHECK(false, "name: unknown self-test ", name);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace emu_selftest

TORCH_LIBRARY_IMPL(idd_ops_emu, CPU, m) { m.impl("_emu_selftest", &emu_selftest::selftest); }
