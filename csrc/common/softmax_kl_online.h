#pragma once
// One-read form of softmax_kl.h's sums: running maxima, with the sums rescaled whenever a
// maximum grows, so a kernel reads each logit once (the two-pass form reads the vector twice).
// Values are the scaled logits u = s / T (student) and v = t / T (teacher). With
// zs = sum exp(u - ms), zt = sum exp(v - mt) and w = sum exp(v - mt) ((v - mt) - (u - ms)) over
// the classes the teacher gives probability > 0 (kl_term), the lse are m + log z and
//   KL = w / zt - log zt + log zs      (softmax_kl.h's form).
// w is kept relative to the running maxima, as the two-pass form's terms are to the final ones:
// a class that is both vectors' maximum adds exactly 0, so a KL far below |ms - mt| keeps its
// relative accuracy. (Terms exp(v - mt) (v - u), with ms - mt added at the end, cancel to
// roundoff at the size of |ms - mt|: a KL of 1.7e-12 with maxima 79 apart came out 0, where the
// two-pass kernels give it to 1e-2; found by the differential fuzzer at seed 20261210.) When the
// maxima grow by dt and ds, every earlier term's bracket falls by dt - ds: shifted_w subtracts
// zt (dt - ds) before the rescaling.
// A maximum of -inf (nothing yet, or a vector that is -inf everywhere) has its sum 0; rescale()
// never forms exp(-inf - -inf). finish() settles a vector with a NaN, or with no finite logit on
// one side, by the rules every softmax-KL kernel follows (softmax_kl.h, softmax_kl_vector).
#include <c10/macros/Macros.h>

#include <limits>

#include "softmax_kl.h"

namespace idd_ops {

template <typename T>
struct OnlineSoftmaxKL {
  T ms = -std::numeric_limits<T>::infinity(), zs = 0;
  T mt = -std::numeric_limits<T>::infinity(), zt = 0, w = 0;

  C10_HOST_DEVICE static bool empty(T m) { return m == -std::numeric_limits<T>::infinity(); }
  // exp(m_old - m_new) for m_new >= m_old, and 0 where the old sums are empty.
  C10_HOST_DEVICE static T rescale(T m_old, T m_new) { return empty(m_old) ? T(0) : vec_exp(m_old - m_new); }
  // The running maximum a never adopts a NaN b (std::max's form, as the CPU and two-pass kernels
  // take their maxima): the NaN then reaches the sums through exp(b - max), or through keep_nan
  // in a part with nothing else but -inf, and finish() makes the vector's outputs NaN.
  // (a > b ? a : b adopted a NaN and dropped it at the next smaller value: NaN then -inf, a
  // chunk's padding or masked classes, left a maximum of -inf and skipped the chunk's finite
  // values and NaN alike: a finite KL and lse where the other kernels give NaN.)
  C10_HOST_DEVICE static T larger(T a, T b) { return a < b ? b : a; }
  // w rescaled to a new teacher maximum: a +inf w (a finite teacher logit over a student -inf,
  // kl_term) stays +inf, where a factor that underflowed to 0 would make it NaN.
  C10_HOST_DEVICE static T rescaled_w(T w, T r) { return w == std::numeric_limits<T>::infinity() ? w : w * r; }
  // w (with its zt, before either is rescaled) moved from the maxima (ms, mt) to (ns, nt) and
  // rescaled by r = exp(mt - nt). Sums without both maxima hold no finite bracket to move: w is
  // 0 (no teacher class yet), +inf (a teacher class over a student -inf) or NaN, and stays so.
  // Nor is there one where r is 0 (the teacher's maximum rose past exp's range: its earlier
  // terms vanish, as the two-pass form's exp(v - mt) does); moving it first could overflow
  // (nt - mt near the dtype's maximum) and make 0 * inf = NaN of a finite KL.
  C10_HOST_DEVICE static T shifted_w(T w, T zt, T ms, T mt, T ns, T nt, T r) {
    if (r == T(0) || empty(ms) || empty(mt) || w == std::numeric_limits<T>::infinity()) return rescaled_w(w, r);
    return (w - zt * ((nt - mt) - (ns - ms))) * r;
  }
  // One class's term: kl_term on the logits less the running maxima (sum_shift: 0 for an empty
  // one), as the two-pass form applies it to the logits less the final maxima; a difference that
  // overflows to -inf takes kl_term's -inf rules there as here.
  C10_HOST_DEVICE T term(T e, T v, T u) const { return kl_term(e, v - sum_shift(mt), u - sum_shift(ms)); }

  // N more classes (held in registers by the caller; -inf pads a short chunk and adds nothing).
  template <int N>
  C10_HOST_DEVICE void add(const T (&u)[N], const T (&v)[N]) {
    T cs = ms, ct = mt;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      cs = larger(cs, u[j]);
      ct = larger(ct, v[j]);
    }
    zs *= rescale(ms, cs);
    const T rt = rescale(mt, ct);
    w = shifted_w(w, zt, ms, mt, cs, ct, rt);
    zt *= rt;
    ms = cs;
    mt = ct;
    if (!empty(ms)) {
#pragma unroll
      for (int j = 0; j < N; ++j) zs += vec_exp(u[j] - ms);
    } else {
      keep_nan(zs, u);
    }
    if (!empty(mt)) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const T e = vec_exp(v[j] - mt);
        zt += e;
        w += term(e, v[j], u[j]);
      }
    } else {
      keep_nan(zt, v);
    }
  }

  // A part with no maximum yet holds nothing but -inf and NaN: its NaN must still reach the sum
  // (rescaling by 0 keeps it there), as the CPU kernels' sum over exp(x - max) keeps it, or a
  // NaN that a later part (chunk, lane) outgrows would vanish from the vector's outputs.
  template <int N>
  C10_HOST_DEVICE static void keep_nan(T& sum, const T (&x)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (x[j] != x[j]) sum = x[j];
  }

  // The sums of this part and another part of the same vector.
  C10_HOST_DEVICE void merge(const OnlineSoftmaxKL& o) {
    const T ns = larger(ms, o.ms), nt = larger(mt, o.mt);
    zs = zs * rescale(ms, ns) + o.zs * rescale(o.ms, ns);
    const T a = rescale(mt, nt), b = rescale(o.mt, nt);
    w = shifted_w(w, zt, ms, mt, ns, nt, a) + shifted_w(o.w, o.zt, o.ms, o.mt, ns, nt, b);
    zt = zt * a + o.zt * b;
    ms = ns;
    mt = nt;
  }

  // in double (softmax_kl.h, SoftmaxKLVector); the maxima are of the scaled logits already
  C10_HOST_DEVICE double lse_s() const { return lse_of(ms, zs); }
  C10_HOST_DEVICE double lse_t() const { return lse_of(mt, zt); }
  C10_HOST_DEVICE T kl() const { return T(w / zt - wide_log(zt) + wide_log(zs)); }

  // The vector's outputs, by softmax_kl_vector's rules: a NaN logit (a NaN sum) gives NaN; a
  // teacher -inf everywhere KL 0, else a student -inf everywhere +inf, both with lse stored as
  // +inf so that the backward's gradient is 0.
  C10_HOST_DEVICE SoftmaxKLVector<T> finish() const {
    constexpr T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
    if (zs != zs || zt != zt) return {nan, nan, nan};
    if (empty(mt)) return {T(0), inf, inf};
    if (empty(ms)) return {inf, inf, inf};
    return {kl(), lse_s(), lse_t()};
  }
};

}  // namespace idd_ops
