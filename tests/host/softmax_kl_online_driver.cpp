// Runs common/softmax_kl_online.h on the host as the CUDA kernels use it: each vector's classes
// go in chunks (-inf padding the last) to `parts` partial sums, round robin like the lanes of a
// row, which are then merged. Reads cases from stdin ("L parts" then L u's and L v's, the
// scaled logits) and prints what finish() gives (kl lse_s lse_t) per case, in float (chunks of 8) and double (4).
#include <cstdio>
#include <limits>
#include <vector>

#include "../../csrc/common/softmax_kl_online.h"

using idd_ops::OnlineSoftmaxKL;

template <typename T, int N>
OnlineSoftmaxKL<T> run(const std::vector<double>& u, const std::vector<double>& v, int parts) {
  std::vector<OnlineSoftmaxKL<T>> sums(parts);
  for (size_t c0 = 0, chunk = 0; c0 < u.size(); c0 += N, ++chunk) {
    T a[N], b[N];
    for (int j = 0; j < N; ++j) {
      const bool in = c0 + j < u.size();
      a[j] = in ? static_cast<T>(u[c0 + j]) : -std::numeric_limits<T>::infinity();
      b[j] = in ? static_cast<T>(v[c0 + j]) : -std::numeric_limits<T>::infinity();
    }
    sums[chunk % parts].add(a, b);
  }
  for (int p = 1; p < parts; ++p) sums[0].merge(sums[p]);
  return sums[0];
}

int main() {
  int cases = 0;
  if (std::scanf("%d", &cases) != 1) return 1;
  for (int c = 0; c < cases; ++c) {
    int length = 0, parts = 0;
    if (std::scanf("%d %d", &length, &parts) != 2) return 1;
    std::vector<double> u(length), v(length);
    for (auto& x : u) std::scanf("%lf", &x);
    for (auto& x : v) std::scanf("%lf", &x);
    const auto f = run<float, 8>(u, v, parts).finish();
    const auto d = run<double, 4>(u, v, parts).finish();
    std::printf("%.9g %.9g %.9g %.17g %.17g %.17g\n", f.kl, f.lse_s, f.lse_t, d.kl, d.lse_s, d.lse_t);
  }
  return 0;
}
