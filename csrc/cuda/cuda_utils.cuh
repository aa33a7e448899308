#pragma once
// Launch and reduction helpers shared by the CUDA kernels of idd_ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace idd_ops {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements; the loop covers whatever the cap leaves.
inline int64_t blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks);
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
