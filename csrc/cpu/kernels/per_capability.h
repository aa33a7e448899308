// Compiles the kernel file named by IDD_KERNEL_FILE once per CPU capability: into namespace
// cpu_default with the build's baseline flags, then (x86-64) into cpu_avx2 under a target
// pragma. Every header the kernel file needs must be included before this one, so inline
// functions and templates from headers keep the baseline target: only code inside the
// capability namespaces is compiled for AVX2, and nothing with that code can be merged by the
// linker into what a CPU without AVX2 runs. No include guard: included once per kernel file.
#include "../dispatch.h"

#define IDD_CPU_NS cpu_default
#include IDD_KERNEL_FILE
#undef IDD_CPU_NS

#ifdef IDD_OPS_CPU_DISPATCH_AVX2
// The AVX2 variant fuses multiply-adds (the build is -ffp-contract=off elsewhere): the exp
// polynomial and the dot products run 10-25 % faster, and its results differ from the
// baseline's by rounding only (tests/test_cpu_dispatch.py holds them to a tolerance).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#pragma clang fp contract(fast)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#endif
#define IDD_CPU_NS cpu_avx2
#include IDD_KERNEL_FILE
#undef IDD_CPU_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
