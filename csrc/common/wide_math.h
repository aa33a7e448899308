#pragma once
// exp, log, sin and cos for the code that CPU and CUDA kernels share (softmax_kl.h,
// softmax_kl_online.h, position.h), in one stated precision per device:
//  - on the host in double, whatever the argument's type, the caller rounding the result once
//    (a few calls per vector or per table entry: negligible);
//  - on a GPU in the argument's type (expf, logf, ...: double runs at a fraction of the rate).
// Unqualified exp(float) would not say which: on the host it is the C library's exp(double)
// unless some header brings std's float overloads into scope first, so its rounding would depend
// on include order and torch version. The host results are those the kernels always gave.
#include <c10/macros/Macros.h>

#include <cmath>

namespace idd_ops {

#ifdef __CUDA_ARCH__
template <typename T> __device__ inline T wide_exp(T x) { return exp(x); }
template <typename T> __device__ inline T wide_log(T x) { return log(x); }
template <typename T> __device__ inline T wide_sin(T x) { return sin(x); }
template <typename T> __device__ inline T wide_cos(T x) { return cos(x); }
#else
template <typename T> C10_HOST_DEVICE inline double wide_exp(T x) { return std::exp(static_cast<double>(x)); }
template <typename T> C10_HOST_DEVICE inline double wide_log(T x) { return std::log(static_cast<double>(x)); }
template <typename T> C10_HOST_DEVICE inline double wide_sin(T x) { return std::sin(static_cast<double>(x)); }
template <typename T> C10_HOST_DEVICE inline double wide_cos(T x) { return std::cos(static_cast<double>(x)); }
#endif

}  // namespace idd_ops
