#pragma once
// KL(softmax(t / T) || softmax(s / T)) along one vector, shared by the CPU and CUDA kernels.
// With a_c = (t_c - max t) / T, b_c = (s_c - max s) / T, zt = sum exp(a), zs = sum exp(b) and
// w = sum exp(a_c) (a_c - b_c):  KL = w / zt - log zt + log zs  (the maxima cancel), and
// d KL / d s_c = (softmax(s / T)_c - softmax(t / T)_c) / T.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace idd_ops {

// exp for the CPU kernels' float loops: branch-free and call-free (Cody-Waite range reduction
// and Cephes' degree-6 polynomial, about 2 ulp on [-87, 88]) so compilers vectorise the loops that
// use it; libm's expf is a call and keeps them scalar. Double and CUDA use the library exp.
C10_HOST_DEVICE inline float vec_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : x;  // ternaries, not fminf/fmaxf: those are calls unless -ffast-math
  x = x > 88.0f ? 88.0f : x;
  // round to nearest by the 1.5 * 2^23 trick: plain adds, vectorisable without SSE4.1's roundps
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

C10_HOST_DEVICE inline double vec_exp(double x) { return exp(x); }

// Accumulated sums of one vector (see the header comment).
template <typename T>
struct SoftmaxKLSums {
  T zt = 0, zs = 0, w = 0;
  C10_HOST_DEVICE void add(T a, T b) {
    const T ea = vec_exp(a);
    zt += ea;
    zs += vec_exp(b);
    w += ea * (a - b);
  }
  C10_HOST_DEVICE T kl() const { return w / zt - log(zt) + log(zs); }
};

}  // namespace idd_ops
