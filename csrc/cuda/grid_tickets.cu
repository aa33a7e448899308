// grid_ticket_counters (grid_tickets.cuh): per (device, stream) counters kept for the process.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "grid_tickets.cuh"

namespace idd_ops {

// Counters a stream's cache starts with: every current user needs one a block of a small grid.
constexpr int64_t kInitialCounters = 1024;

at::Tensor grid_ticket_counters(const at::Device& device, int64_t n) {
  const auto options = at::TensorOptions().device(device).dtype(at::kInt);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return at::zeros({n}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  static std::mutex mutex;
  // never destroyed: CUDA may be torn down before static destructors run
  static auto& cache = *new std::map<std::pair<int, cudaStream_t>, at::Tensor>;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counters = cache[{device.index(), stream}];
  if (!counters.defined() || counters.numel() < n) {
    // the old counters are at 0 and free once the kernels queued before on this stream are done,
    // which the caching allocator's stream order guarantees
    counters = at::zeros({std::max({n, kInitialCounters, 2 * (counters.defined() ? counters.numel() : 0)})}, options);
  }
  return counters;
}

}  // namespace idd_ops
