// The CPU capability chosen once per process, and the op that reports it.
#include "dispatch.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

namespace idd_ops {
namespace {

CpuCapability detect() {
#ifdef IDD_OPS_CPU_DISPATCH_AVX2
  __builtin_cpu_init();  // checks the OS saves YMM (and ZMM) state too, not only the CPUID bits
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return CpuCapability::Default;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return CpuCapability::AVX512;
  return CpuCapability::AVX2;
#endif
  return CpuCapability::Default;
}

CpuCapability choose() {
  const CpuCapability best = detect();
  const char* env = std::getenv("IDD_OPS_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return best;
  std::string want(env);
  for (char& ch : want) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  // A request can only lower the choice: asking for AVX2 on a CPU without it gets the baseline.
  if (want == "default") return CpuCapability::Default;
  if (want == "avx2") return std::min(best, CpuCapability::AVX2);
  if (want == "avx512") return best;
  TORCH_CHECK_VALUE(false, "IDD_OPS_CPU_CAPABILITY: expected \"default\", \"avx2\" or \"avx512\", got \"", env, "\"");
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability chosen = choose();
  return chosen;
}

const char* cpu_capability_name(CpuCapability c) {
  return c == CpuCapability::AVX512 ? "avx512" : c == CpuCapability::AVX2 ? "avx2" : "default";
}

TORCH_LIBRARY_FRAGMENT(idd_ops, m) {
  // The CPU kernel variant this process runs: "default" (baseline x86-64), "avx2" or "avx512".
  m.def("_cpu_capability() -> str", [] { return std::string(cpu_capability_name(cpu_capability())); });
}

}  // namespace idd_ops
