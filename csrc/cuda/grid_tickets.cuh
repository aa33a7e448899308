#pragma once
// A grid's last block: kernels whose blocks each write a part of a result, and whose last block to
// finish combines the parts, where a second kernel would otherwise do it (a launch fewer: on the
// H200's machine each launch cost the host 15-40 us, more than the small kernels it saved). The
// counters are device memory that starts at 0 and that every use leaves at 0 again
// (grid_ticket_counters, grid_tickets.cu).
#include <ATen/ATen.h>

namespace idd_ops {

// Whether this block is the last of `arrivals` blocks to call this on `counter`, the same answer
// for every thread of the block. The last one sets the counter back to 0 and sees every write the
// other blocks' threads made before their call. The block's first thread (of any block shape)
// fences after the barrier and then takes the ticket (release: the barrier brings the block's
// writes into its fence's reach); in the last block it fences again before the barrier that lets
// the others read (acquire). Calls __syncthreads: every thread must reach it. `flag`: one bool of
// shared memory.
__device__ inline bool last_to_arrive(unsigned* counter, unsigned arrivals, bool* flag) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    __threadfence();
    const bool last = atomicAdd(counter, 1u) == arrivals - 1;
    if (last) {
      atomicExch(counter, 0u);  // no other block of this launch takes one after the last
      __threadfence();
    }
    *flag = last;
  }
  __syncthreads();
  return *flag;
}

// At least n unsigned counters at 0 for last_to_arrive on the current stream of `device` (int32
// storage; hold the tensor until the kernel is queued). Outside graph capture, the same counters
// for every call on a stream (per host thread on the per-thread default stream, whose one handle
// names each thread's own stream; a buffer from cudaMalloc, kept for the process): each kernel
// leaves them at 0 and the stream orders the kernels, so no call pays a fill. A graph being
// captured gets counters of its own, zeroed by a node of the graph, so that each replay finds
// them at 0 whatever ran on the stream before.
at::Tensor grid_ticket_counters(const at::Device& device, int64_t n);

}  // namespace idd_ops
