#pragma once
// The current stream, for the emulator (tests/cuda_emu): launches run at once, in order.
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int /*device*/ = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
