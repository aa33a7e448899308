// Compiles the kernel file named by IDD_KERNEL_FILE once per CPU capability: into namespace
// cpu_default with the build's baseline flags, then (x86-64) into cpu_avx2 and cpu_avx512 under
// target pragmas. Every header the kernel file needs must be included before this one, so inline
// functions and templates from headers keep the baseline target: only code inside the
// capability namespaces is compiled for AVX2 or AVX-512, and nothing with that code can be merged
// by the linker into what a CPU without them runs. No include guard: included once per kernel
// file.
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

// The AVX-512 variant: the same source with 16-float vectors where the compiler vectorises a
// loop itself (the softmax-KL's exp loops: pixel KD forward+backward 1.27x and CWD 1.4x faster
// than the AVX2 variant on an AVX-512 Xeon, one thread; docs/DEVELOPING.md). The explicit
// 8-float kernels (vec8.inc) compile as they do for AVX2. prefer-vector-width=512 asks for
// 512-bit vectors, which some of GCC's tunings otherwise avoid.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"))), \
                             apply_to = function)
#pragma clang fp contract(fast)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#pragma GCC optimize("fp-contract=fast")
#endif
#define IDD_CPU_NS cpu_avx512
#include IDD_KERNEL_FILE
#undef IDD_CPU_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
