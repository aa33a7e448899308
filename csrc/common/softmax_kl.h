#pragma once
// KL(softmax(t / T) || softmax(s / T)) along one vector, shared by the CPU and CUDA kernels.
// With a_c = (t_c - max t) / T, b_c = (s_c - max s) / T, zt = sum exp(a), zs = sum exp(b) and
// w = sum exp(a_c) (a_c - b_c):  KL = w / zt - log zt + log zs  (the maxima cancel), and
// d KL / d s_c = (softmax(s / T)_c - softmax(t / T)_c) / T.
// A class the teacher gives probability 0 (logit -inf, a masked class) adds nothing to w: its
// term is 0 * (-inf), taken as its limit 0 (see kl_term), so the KL stays finite and exact.
// Vectors with no finite logit on one side, and vectors with a NaN, are settled per vector by
// softmax_kl_vector.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "wide_math.h"

namespace idd_ops {

// exp for the CPU kernels' float loops: branch-free and call-free (Cody-Waite range reduction
// and Cephes' degree-6 polynomial, about 2 ulp on [-87, 88]) so compilers vectorise the loops that
// use it; libm's expf is a call and keeps them scalar. Double and CUDA use the library exp.
C10_HOST_DEVICE inline float vec_exp(float x_in) {
#ifdef __CUDA_ARCH__
  return expf(x_in);
#else
  // Below -87 the result is under 1.7e-38 and is returned as 0, so exp(-inf) is exactly 0.
  float x = x_in < -87.0f ? -87.0f : x_in;  // ternaries, not fminf/fmaxf: those are calls unless -ffast-math
  x = x > 88.0f ? 88.0f : x;
  // round to nearest by the 1.5 * 2^23 trick: plain adds, vectorisable without SSE4.1's roundps;
  // the sum's low mantissa bits hold n as an integer, read from its bits (converting the float n
  // would be undefined for a NaN x)
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // unsigned: any bits of a NaN wrap instead of overflowing (and a left shift of a negative
  // int is undefined before C++20)
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const uint32_t bits = (shifted_bits - 0x4B400000u + 127u) << 23;  // 0x4B400000: the bits of 12582912.0f
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x_in < -87.0f ? 0.0f : p * scale;
#endif
}

C10_HOST_DEVICE inline double vec_exp(double x) { return exp(x); }

// One class's term exp(a) (a - b) of w: 0 for a teacher logit of -inf (probability 0), and +inf
// for a finite teacher logit over a student -inf, decided on the logits rather than on exp(a),
// which rounds to 0 (or, in vec_exp, is flushed to 0) for a teacher far below its maximum: that
// probability is still > 0, so the KL is +inf (METHOD.md, "-inf logits").
template <typename T>
C10_HOST_DEVICE inline T kl_term(T ea, T a, T b) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  return a == -inf ? T(0) : b == -inf ? inf : ea * (a - b);
}

// What a vector's sums subtract from its logits: the maximum, or 0 where that is -inf (the
// maxima skip NaN, so: every logit -inf or NaN). A vector of -inf then sums exp(-inf) = 0, not
// exp(-inf - -inf) = NaN, and a NaN sum means a NaN (or +inf) logit, which softmax_kl_vector
// reports.
template <typename T>
C10_HOST_DEVICE inline T sum_shift(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// Accumulated sums of one vector (see the header comment), of logits less their sum_shift.
template <typename T>
struct SoftmaxKLSums {
  T zt = 0, zs = 0, w = 0;
  C10_HOST_DEVICE void add(T a, T b) {
    const T ea = vec_exp(a);
    zt += ea;
    zs += vec_exp(b);
    w += kl_term(ea, a, b);
  }
};

// What one vector yields: its KL, and the log-sum-exps of s / T and t / T the backward uses, in
// double whatever T is: the backward's probability exp(x / T - lse) is only as accurate as lse
// is absolutely, and a float lse of logits around 100 is off by up to 4e-6, an error every
// probability of the vector shares (float32 pixel KD's gradient was 15x less accurate than a
// float32 log_softmax at logits around 30). See split_lse for how the backward reads them.
template <typename T>
struct SoftmaxKLVector {
  T kl;
  double lse_s, lse_t;
};

// A stored log-sum-exp as the pair hi + lo of the backward's dtype (hi the nearest value, lo the
// rest), so that x / T - lse is computed as (x / T - hi) - lo: the first difference is exact
// where the two are within a factor of 2 (for large logits, every entry that has a probability
// worth the name; small ones have a small lse and little to lose), and the second adds what hi
// rounded off. Split once per vector, it costs one subtraction an element.
// +inf (a vector settled by the -inf rule) and NaN keep lo = 0: lse - hi would be NaN there.
template <typename T>
struct SplitLse {
  T hi, lo;
};

template <typename T>
C10_HOST_DEVICE inline SplitLse<T> split_lse(double lse) {
  const T hi = static_cast<T>(lse);
  return {hi, hi - hi == T(0) ? static_cast<T>(lse - static_cast<double>(hi)) : T(0)};
}

// exp(u - lse) of a scaled logit u = x / T: a probability, as the backward needs it.
template <typename T>
C10_HOST_DEVICE inline T probability(T u, SplitLse<T> lse) {
  return vec_exp((u - lse.hi) - lse.lo);
}

// log sum exp(x / T) from the vector's scaled maximum (x * inv_T in T, as the backward scales
// its logits, then widened) and its sum of exp(x / T - that maximum).
template <typename T>
C10_HOST_DEVICE inline double lse_of(T scaled_max, T z) {
  return static_cast<double>(scaled_max) + wide_log(static_cast<double>(z));
}

// The outputs of one vector from its maxima ms, mt and sums (METHOD.md, "-inf logits"):
//  - a NaN logit on either side (its sum is NaN, see sum_shift): NaN outputs, so that the loss
//    and the gradient are both NaN, never a finite loss over a NaN gradient;
//  - teacher logits all -inf (a channel or pixel masked everywhere): the teacher puts no mass
//    anywhere, every term p_t (log p_t - log p_s) is 0, so the KL is 0;
//  - else student logits all -inf: the student has no mass where the teacher has some: +inf.
// Both are constant in the student (a -inf logit stays -inf under any finite change), so their
// gradient is 0: both log-sum-exps are stored as +inf, which makes the backward's
// exp(x / T - lse) 0 on both sides. Every kernel of the softmax-KL ops ends a vector through
// this function (the one-read kernels through OnlineSoftmaxKL::finish, by the same rules).
template <typename T>
C10_HOST_DEVICE inline SoftmaxKLVector<T> softmax_kl_vector(T ms, T mt, T zs, T zt, T w, T inv_T) {
  constexpr T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  if (zs != zs || zt != zt) return {nan, nan, nan};
  if (mt == -inf) return {T(0), inf, inf};
  if (ms == -inf) return {inf, inf, inf};
  return {T(w / zt - wide_log(zt) + wide_log(zs)), lse_of(ms * inv_T, zs), lse_of(mt * inv_T, zt)};
}

}  // namespace idd_ops
