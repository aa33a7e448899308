#pragma once
// The emulator's memory model (memory_model.cpp): every load and store the emulated kernels make,
// seen through GCC's thread-sanitizer instrumentation (build.py compiles the kernel sources with
// -fsanitize=thread and no sanitizer runtime; memory_model.cpp defines the hooks it calls; calls
// to memcpy/memset are not seen). It gives
//  - races between blocks: a global byte that one block writes (or updates atomically) and
//    another block of the same launch reads or writes raises, naming both blocks, since CUDA
//    runs blocks in no promised order and the emulator's sequential blocks would hide it. Except
//    where the release/acquire pattern orders them: block w's writes before a __threadfence, then
//    an atomic of w's on address A, are released at A; a later block whose atomic on A comes after
//    (in the emulator's block order, as the atomic's value would show on a GPU) and then a
//    __threadfence may read and overwrite them (a "last block" finishing a grid's work,
//    cuda/grid_tickets.cuh). A write after w's last fence, or a read before the reader's fence,
//    still raises;
//  - a traffic model per launch: warp-level requests to global memory and the 32-byte sectors
//    they touch (coalescing), the distinct sectors a launch reads and writes (the DRAM traffic
//    when every reuse hits in L2), atomics, shared-memory wavefronts (bank conflicts) and warp
//    collectives.
//  - accesses outside allocations: a global access that touches a redzone, the bytes guard()
//    keeps on either side of each CPU tensor's storage allocated while the emulator is loaded
//    (redzone_allocator.cpp), raises, naming the allocation and the offset; where a GPU would
//    read another allocation's bytes or fault with an illegal address.
// An access is global unless it is on a fiber's or the launching thread's stack or in shared
// memory (the launch's dynamic buffer or a block's static __shared__ arrays).
#include <cstddef>
#include <cstdint>
#include <string>

#include "emu.h"

namespace emu::memory {

// Bits of the mode: kRaces checks races between blocks and accesses in redzones, kTraffic counts
// the traffic model.
constexpr int kRaces = 1;
constexpr int kTraffic = 2;
int set_mode(int mode);  // returns the mode before

enum class Kind : uint8_t { Read, Write, Atomic };

// The emulator's calls (emu.cpp): a launch of `blocks` blocks of `threads` threads, each block's
// start and end, and which thread runs (linear index and its stack), -1 between threads.
void begin_launch(const char* where, dim3 grid, int threads, const void* shared, size_t shared_bytes);
void end_launch();
void begin_block(uint64_t block);
void end_block();
void enter_thread(int linear, const void* stack, size_t stack_bytes);
void leave_thread();
void add_static_shared(const void* p, size_t bytes);

// A lane's part in a warp collective (a shuffle, vote or __syncwarp): counted per launch, as a
// measure of the warp-synchronous work a kernel does besides its memory traffic.
void collective();

// The allocation [data, data + bytes) with `redzone` bytes before and after it that no kernel may
// touch; unguard with the same arguments when it is freed. Safe from any thread.
void guard(const void* data, size_t bytes, size_t redzone);
void unguard(const void* data, size_t bytes, size_t redzone);

// One access of `bytes` at p by the running thread, from the instruction at pc.
void access(const void* p, size_t bytes, Kind kind, bool floating, const void* pc);
// A __threadfence by the running thread (the release/acquire rule above).
void fence();

// The launches counted since the last call, one tab-separated line each (traffic.py reads them).
std::string take_log();

}  // namespace emu::memory
