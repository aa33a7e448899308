#pragma once
// A CUDA execution model on the CPU, for testing the library's CUDA kernels on machines without a
// GPU (tests/test_cuda_emulated.py). Each block's threads run as cooperative fibers on one OS
// thread: a thread runs until it reaches a barrier (__syncthreads, a warp shuffle, vote or
// __syncwarp), and a barrier opens when every live thread it waits for has reached it. Blocks run
// one after another in a shuffled order, and the threads of each phase in a shuffled order, so a
// kernel that relies on an order CUDA does not promise (a missing barrier, one block reading
// another's output) gives a different answer from run to run. Shared memory (static and dynamic)
// starts each block filled with 0xFF bytes (NaN, -1), like the garbage a GPU leaves there.
//
// Checked at every launch, where CUDA would fail or misbehave: block size (<= 1024 threads), grid
// size, dynamic shared memory (<= 48 KiB unless the kernel opted in with cudaFuncSetAttribute,
// never past the opt-in limit; static and dynamic together <= 48 KiB without the opt-in, static
// plus the opt-in limit <= 227 KiB, checked once a thread reaches each static array), barriers
// that not every thread reaches (a deadlock here), a shuffle that reads a lane which has exited,
// a misaligned vector access (cuda_utils.cuh's load_vec/store_vec, checked by build.py's
// rewrite) and device asserts. Each is raised on the host as a C++ exception (a RuntimeError in
// Python) naming the kernel's launch.
//
// Every load and store is also seen by the memory model (memory_model.h): races between blocks raise,
// and a launch's global traffic, coalescing, atomics and shared-memory bank conflicts are counted.
//
// Not modelled: timing, caches, the GPU's float rounding of fused multiply-adds and fast-math
// intrinsics.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace emu {

// Limits of the emulated device (an H100/H200 class GPU).
constexpr int kMultiprocessors = 132;
constexpr size_t kDefaultShared = 48 * 1024;
constexpr size_t kOptinShared = 227 * 1024;
constexpr size_t kSharedPerMultiprocessor = 228 * 1024;

struct Fiber;

// What a kernel reads of the running thread and its launch.
// (By value: a reference would make the kernel read the emulator's state, which the memory model
// would count as global memory.)
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void* dynamic_shared();

void sync_block();
// Every lane of `mask` in the caller's warp writes `bytes` of `value` and waits for the others;
// read_lane then gives lane `lane`'s value (an error when that lane has exited or is outside mask);
// finish_exchange waits until every lane has read, before the slots are reused.
void start_exchange(unsigned mask, const void* value, size_t bytes);
void read_lane(unsigned mask, int lane, void* out, size_t bytes);
void finish_exchange(unsigned mask);
int lane_id();

// Fills a static __shared__ array with 0xFF bytes the first time a thread of a block reaches it.
void poison_shared(void* p, size_t bytes);
[[noreturn]] void device_assert(const char* condition, const char* file, int line);
// Ends the running thread with a fault that its launch raises on the host (the launch, block
// and thread named before `message`), without unwinding the thread's stack: the memory model
// calls it from sanitizer hooks, which GCC's instrumented code calls as if they never throw.
[[noreturn]] void fault(const std::string& message);
// Accesses the memory model sees whole (memory_model.h): a vector load or store, and an atomic
// read-modify-write, from the instruction at pc. Their own bodies are left uninstrumented.
void vector_access(const void* p, size_t bytes, bool write, const void* pc);
void atomic_access(const void* p, size_t bytes, bool floating, const void* pc);
// __threadfence by the running thread: with atomics, how one block's writes become visible to
// another's reads in one launch (memory_model.h).
void fence();
// A vector access of `bytes` at p: a GPU faults ("misaligned address") unless p is a multiple of
// it, where x86 would read it silently.
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    device_assert("misaligned address: a vector access not aligned to its size", __FILE__, __LINE__);
}

// Dynamic shared memory a kernel may request beyond the default (cudaFuncSetAttribute).
void set_max_dynamic_shared(const void* kernel, int bytes);

// Runs `body` once in every thread of a grid.
void run_grid(const char* where, const void* kernel, dim3 grid, dim3 block, size_t shared,
              const std::function<void()>& body);

// Settings the tests choose: the IDD_OPS_CUDA_NEXT kernels (every group or none; set_next_groups
// then some: one bit a group, csrc/common/next_groups.h), and the seed of the orders.
uint32_t next_groups();
void set_next_groups(uint32_t groups);
void configure(bool cuda_next, int64_t seed);
int64_t launches();
// Launches and emulated seconds per launch site, one "site\tlaunches\tseconds" line each.
std::string profile();
// The launches since the last call, as (blocks, threads per block, dynamic shared bytes) triples:
// a test asserts which plan (kernel shape) a host function chose.
std::vector<int64_t> take_launch_log();

struct Config {
  dim3 grid, block;
  size_t shared;
};

inline Config config(dim3 grid, dim3 block, size_t shared = 0, cudaStream_t = nullptr) {
  return Config{grid, block, shared};
}

template <typename... Params, typename... Args>
void launch(const char* where, const Config& cfg, void (*kernel)(Params...), Args&&... args) {
  // Parameters are copied once, as CUDA copies them to the device; every thread reads the copy.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(where, reinterpret_cast<const void*>(kernel), cfg.grid, cfg.block, cfg.shared,
           [&] { std::apply(kernel, params); });
}

template <typename T>
T shuffle(unsigned mask, T value, int width, int (*source)(int lane, int arg, int width), int arg) {
  start_exchange(mask, &value, sizeof(T));
  const int lane = lane_id();
  int src = source(lane, arg, width);
  T out;
  read_lane(mask, src, &out, sizeof(T));
  finish_exchange(mask);
  return out;
}

inline int source_index(int lane, int src, int width) { return (lane & ~(width - 1)) + (src % width); }
inline int source_down(int lane, int delta, int width) {
  return (lane % width) + delta < width ? lane + delta : lane;
}
inline int source_up(int lane, int delta, int width) { return (lane % width) - delta >= 0 ? lane - delta : lane; }
inline int source_xor(int lane, int mask, int width) {
  const int src = lane ^ mask;
  return (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane;
}

unsigned vote(unsigned mask, bool predicate);

}  // namespace emu

// The CUDA names device code uses.
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__  // a call or inlined: the same semantics on the CPU
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads() { ::emu::sync_block(); }
inline void __threadfence() { ::emu::fence(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::emu::start_exchange(mask, nullptr, 0);
  ::emu::finish_exchange(mask);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::emu::shuffle(mask, v, width, ::emu::source_index, src);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(mask, v, width, ::emu::source_down, static_cast<int>(delta));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(mask, v, width, ::emu::source_up, static_cast<int>(delta));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::shuffle(mask, v, width, ::emu::source_xor, lane_mask);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) { return ::emu::vote(mask, predicate != 0); }
inline int __all_sync(unsigned mask, int predicate) { return ::emu::vote(mask, predicate != 0) == mask; }
inline int __any_sync(unsigned mask, int predicate) { return ::emu::vote(mask, predicate != 0) != 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// Functions whose memory accesses the sanitizer hooks should not see one by one.
#define EMU_UNCHECKED __attribute__((no_sanitize("thread"), noinline))
#define EMU_NOTE_ATOMIC(address) \
  ::emu::atomic_access(address, sizeof(T), !std::is_integral_v<T>, __builtin_return_address(0))

// Threads of a block switch only at barriers, so a plain read-modify-write is atomic here.
template <typename T, typename U>
EMU_UNCHECKED T atomicAdd(T* address, U value) {
  EMU_NOTE_ATOMIC(address);
  const T old = *address;
  *address = static_cast<T>(old + value);
  return old;
}
template <typename T, typename U>
EMU_UNCHECKED T atomicMax(T* address, U value) {
  EMU_NOTE_ATOMIC(address);
  const T old = *address;
  if (static_cast<T>(value) > old) *address = static_cast<T>(value);
  return old;
}
template <typename T, typename U>
EMU_UNCHECKED T atomicMin(T* address, U value) {
  EMU_NOTE_ATOMIC(address);
  const T old = *address;
  if (static_cast<T>(value) < old) *address = static_cast<T>(value);
  return old;
}
template <typename T, typename U>
EMU_UNCHECKED T atomicExch(T* address, U value) {
  EMU_NOTE_ATOMIC(address);
  const T old = *address;
  *address = static_cast<T>(value);
  return old;
}
template <typename T, typename U, typename V>
EMU_UNCHECKED T atomicCAS(T* address, U compare, V value) {
  EMU_NOTE_ATOMIC(address);
  const T old = *address;
  if (old == static_cast<T>(compare)) *address = static_cast<T>(value);
  return old;
}

// CUDA's device math is global: isfinite and friends without std::, min/max of mixed integer widths.
using std::isfinite;
using std::isinf;
using std::isnan;

// For floating types they are fminf/fmaxf, which return the other argument where one is NaN.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<T>) return std::fmin(static_cast<T>(a), static_cast<T>(b));
  else return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<T>) return std::fmax(static_cast<T>(a), static_cast<T>(b));
  else return a < b ? b : a;
}

#define EMU_KERNEL_ASSERT(cond) \
  do {                          \
    if (!(cond)) ::emu::device_assert(#cond, __FILE__, __LINE__); \
  } while (0)
