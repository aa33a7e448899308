#pragma once
// Launch and reduction helpers shared by the CUDA kernels of idd_ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <limits>
#include <map>
#include <mutex>
#include <utility>

namespace idd_ops {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements; the loop covers whatever the cap leaves.
inline int64_t blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks);
}

// Blocks along a grid's y or z dimension, at most.
constexpr int64_t kMaxGridYZ = 65535;

// A grid's x dimension as dim3 takes it: at most 2^31 - 1 blocks. A larger count, narrowed to
// dim3's unsigned int, would fail to launch or (past 2^32) launch a wrapped grid that leaves
// blocks out, so it is refused by the name of the argument whose size asked for it.
inline unsigned int grid_x(int64_t blocks, const char* argument) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max(), argument, ": its size needs ", blocks,
                    " blocks in one CUDA grid, more than the 2^31 - 1 a grid holds");
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// N values of T in one aligned register group, for 16-byte (or narrower) loads and stores:
// the address must be a multiple of sizeof(Vec) (callers check and fall back to N = 1).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

// A 16-byte Vec goes out as one st.global.v4: assigned as a struct, nvcc split some of these
// stores into four 4-byte ones (seen in the sm_90 SASS of the class-sum backward's rows kernel,
// 32-bit index variant, and of the position loss; tools/sass_audit.py lists such splits).
// `p` must point to global memory (every caller's output tensor).
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(Vec<T, N>) == 16) {
    unsigned w[4];
    memcpy(w, &v, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
    return;
  }
#endif
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Elements of a 16-byte vector of T.
template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Sum over the 32 lanes of a warp by an xor butterfly: every lane ends with the same bits
// (each step adds the same two values in either order), in the same order on every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Reduction of one value per thread over a block of kThreads threads with a binary op;
// every thread gets the result. `scratch` is shared memory of kThreads elements.
template <typename T, typename Op>
__device__ T block_reduce(T value, T* scratch, Op op) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + half]);
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return total;
}

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

template <typename T>
__device__ T block_sum(T value, T* scratch) {
  return block_reduce(value, scratch, SumOp{});
}

template <typename T>
__device__ T block_max(T value, T* scratch) {
  return block_reduce(value, scratch, MaxOp{});
}

// Raises `kernel`'s dynamic shared-memory limit on `device` to at least `bytes`, never lowering
// it: set to each call's own size, a host thread launching with fewer bytes could lower the limit
// between another thread's setting and its launch, which then fails ("invalid argument"). Once
// raised, later calls make no cudaFuncSetAttribute call.
inline void raise_dynamic_shared(const void* kernel, int bytes, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  int& limit = granted[{kernel, device}];
  if (bytes <= limit) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  limit = bytes;
}

// Per-class sums live in shared memory; past the default 48 KiB (about 1200 classes) a kernel
// must opt in to more, up to what the GPU offers.
template <typename Kernel>
inline void allow_shared_memory(Kernel kernel, size_t bytes, int device, int64_t num_classes) {
  constexpr size_t kDefault = 48 * 1024;
  if (bytes <= kDefault) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(bytes <= static_cast<size_t>(optin), "num_classes: ", num_classes, " classes need ", bytes,
                    " bytes of shared memory per block on CUDA, more than this GPU's ", optin);
  raise_dynamic_shared(reinterpret_cast<const void*>(kernel), static_cast<int>(bytes), device);
}

// Labels are read as uint8, int32 or int64; rarer integer dtypes are widened once.
inline at::Tensor canonical_labels(const at::Tensor& labels) {
  const auto t = labels.scalar_type();
  return (t == at::kByte || t == at::kInt || t == at::kLong) ? labels : labels.to(at::kLong);
}

}  // namespace idd_ops

#define IDD_DISPATCH_LABEL_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kInt, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kLong, __VA_ARGS__))
