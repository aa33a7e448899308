// grid_ticket_counters (grid_tickets.cuh): per (device, stream) counters kept for the process.
// The per-thread default stream has one handle (cudaStreamPerThread) for what is a stream of each
// host thread's own, whose kernels may overlap another thread's: its counters are kept per thread
// too (a thread that ends leaves its buffer allocated, as every buffer is; a later thread given
// the same id takes it over, safe once the ended thread's kernels have run).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "grid_tickets.cuh"

namespace idd_ops {
namespace {

// Counters a stream's buffer starts with: every current user needs one a block of a small grid.
constexpr int64_t kInitialCounters = 1024;

struct Counters {
  int* data = nullptr;
  int64_t size = 0;
};

}  // namespace

at::Tensor grid_ticket_counters(const at::Device& device, int64_t n) {
  const auto options = at::TensorOptions().device(device).dtype(at::kInt);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return at::zeros({n}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  static std::mutex mutex;
  // never destroyed: CUDA may be torn down before static destructors run
  static auto& buffers = *new std::map<std::tuple<int, cudaStream_t, std::thread::id>, Counters>;
  const std::thread::id owner = stream == cudaStreamPerThread ? std::this_thread::get_id() : std::thread::id();
  const std::lock_guard<std::mutex> lock(mutex);
  Counters& c = buffers[{device.index(), stream, owner}];
  if (c.size < n) {
    // From cudaMalloc, not the caching allocator: a buffer kept for the process must not come
    // from a memory pool that torch.compile's CUDA graphs (mode="reduce-overhead") check and
    // recycle while warming up, which the allocator serves this thread from then. The buffer it
    // replaces stays allocated (kernels queued before on this stream may still count in it): at
    // most the final size again, since the size doubles.
    const int64_t size = std::max({n, kInitialCounters, 2 * c.size});
    int* data = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&data, size * sizeof(int)));
    C10_CUDA_CHECK(cudaMemsetAsync(data, 0, size * sizeof(int), stream));
    c = {data, size};
  }
  return at::from_blob(c.data, {c.size}, options);
}

}  // namespace idd_ops
