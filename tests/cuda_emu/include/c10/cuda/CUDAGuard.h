#pragma once
// Device guards, for the emulator (tests/cuda_emu): it has one device.
#include <c10/cuda/CUDAStream.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  template <typename Device>
  explicit CUDAGuard(const Device&) {}
};
using OptionalCUDAGuard = CUDAGuard;

}  // namespace cuda
}  // namespace c10
