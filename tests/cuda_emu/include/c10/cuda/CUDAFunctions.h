#pragma once
// Device queries, for the emulator (tests/cuda_emu): one device, index 0.
#include <c10/cuda/CUDAStream.h>
#include <cstdint>

namespace c10 {
namespace cuda {

inline int8_t current_device() { return 0; }
inline int8_t device_count() { return 1; }

}  // namespace cuda
}  // namespace c10
