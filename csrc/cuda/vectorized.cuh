#pragma once
// 16-byte loads and stores, and warp/block sums by shuffles. A pack is used only where the host
// checked the pointer's alignment and the length (aligned_for and pack_size below); otherwise the
// kernels run with packs of 1.
#include <c10/cuda/CUDAFunctions.h>

#include <atomic>
#include <cstdint>

#include "cuda_utils.cuh"

namespace idd_ops {

// Elements of scalar_t in one 16-byte access (float 4, half/bfloat16 8, double 2).
template <typename scalar_t>
constexpr int pack_size() {
  return vec16<scalar_t>();
}

// A pack is cuda_utils.cuh's Vec; these spell its loads with the element count first.
template <typename T, int N>
using Pack = Vec<T, N>;

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return load_vec<T, N>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  store_vec<T, N>(p, x);
}

// Whether packs of `n` elements of `elem_bytes` may be read at p + k * n for any k.
inline bool aligned_for(const void* p, int n, size_t elem_bytes) {
  return reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(n) * elem_bytes) == 0;
}

// Multiprocessors of the current device, asked once per device (a host query: no stream work,
// so it may run during graph capture).
inline int sm_count() {
  static std::atomic<int> cached[64] = {};
  const int device = c10::cuda::current_device();
  if (device < 64 && cached[device].load() > 0) return cached[device].load();
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device].store(n);
  return n;
}

// Sum over a block of at most kThreads threads, whole warps, of any shape (warps follow the
// linear thread index); the result is valid in the block's first thread. Every thread of the
// block must call it, once per kernel, or again only past a barrier after the previous call (its
// shared slots are not guarded for reuse).
template <typename T>
__device__ T block_sum_any_shape(T value) {
  __shared__ T warp_totals[kThreads / 32];
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int warps = blockDim.x * blockDim.y * blockDim.z / 32;  // a smaller block reads no stale slot
  value = warp_sum(value);
  if (tid % 32 == 0) warp_totals[tid / 32] = value;
  __syncthreads();
  T total = 0;
  if (tid < 32) total = warp_sum(tid < warps ? warp_totals[tid] : T(0));
  return total;
}

}  // namespace idd_ops
