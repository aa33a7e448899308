#pragma once
// Runtime CPU dispatch for the kernels whose speed depends on vector width. Their loops live in
// kernels/<op>.inc, compiled once per capability into namespace cpu_default (baseline x86-64,
// SSE2) and, on x86-64, cpu_avx2 (AVX2 + FMA) and cpu_avx512 (AVX-512 F/BW/VL/DQ + FMA), through
// target pragmas, so no -m flag reaches code every CPU runs; see kernels/per_capability.h. The host functions pick a variant per call with
// IDD_CPU_KERNEL, from a choice made once per process (cpu_capability()).
#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define IDD_OPS_CPU_DISPATCH_AVX2 1  // and AVX-512: the two variants come together
#endif

namespace idd_ops {

enum class CpuCapability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

// The variant used by this process: the best the running CPU supports, lowered by the
// environment variable IDD_OPS_CPU_CAPABILITY ("default", "avx2" or "avx512"), read on first use.
CpuCapability cpu_capability();

const char* cpu_capability_name(CpuCapability c);

}  // namespace idd_ops

// Declares a kernel in every capability's namespace: IDD_DECLARE_CPU_KERNEL(template <...> T f(...)).
// The call IDD_CPU_KERNEL(f<scalar_t>) names the variant chosen for this process.
#ifdef IDD_OPS_CPU_DISPATCH_AVX2
#define IDD_DECLARE_CPU_KERNEL(...)  \
  namespace cpu_default {            \
  __VA_ARGS__;                       \
  }                                  \
  namespace cpu_avx2 {               \
  __VA_ARGS__;                       \
  }                                  \
  namespace cpu_avx512 {             \
  __VA_ARGS__;                       \
  }
#define IDD_CPU_KERNEL(...)                                                                                \
  (::idd_ops::cpu_capability() == ::idd_ops::CpuCapability::AVX512 ? ::idd_ops::cpu_avx512::__VA_ARGS__  \
   : ::idd_ops::cpu_capability() == ::idd_ops::CpuCapability::AVX2 ? ::idd_ops::cpu_avx2::__VA_ARGS__    \
                                                                    : ::idd_ops::cpu_default::__VA_ARGS__)
#else
#define IDD_DECLARE_CPU_KERNEL(...) \
  namespace cpu_default {           \
  __VA_ARGS__;                      \
  }
#define IDD_CPU_KERNEL(...) (::idd_ops::cpu_default::__VA_ARGS__)
#endif
