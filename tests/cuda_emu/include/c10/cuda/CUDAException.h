#pragma once
// c10's CUDA error macros over the emulator's runtime (tests/cuda_emu): an emulated launch
// reports its faults by throwing, so the launch check has nothing left to ask.
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                     \
  do {                                                                           \
    const cudaError_t emu_error = (expr);                                        \
    TORCH_CHECK(emu_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(emu_error)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
