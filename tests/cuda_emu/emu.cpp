// The fiber scheduler behind emu.h: one block at a time, its threads as fibers. On x86-64 a fiber
// switch is a few instructions (switch_stack below: a thread switch at every barrier makes the
// emulator's speed that of its switches); elsewhere ucontext, whose switches make a system call.
#include "emu.h"
#include "memory_model.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace emu {

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

}  // namespace

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *save and resumes
// the stack at `load` (one saved by switch_stack, or a new one from new_stack).
extern "C" void emu_switch_stack(void** save, void* load);
asm(R"(
.text
.globl emu_switch_stack
.type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch_stack, .-emu_switch_stack
)");

struct Context {
  void* sp = nullptr;
};

// A stack whose first switch enters `entry` as if called (the ABI's alignment), with zeroed
// callee-saved registers; entry must never return.
void new_stack(Context* c, void* base, size_t bytes, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(base) + bytes) & ~uintptr_t{15};
  auto* words = reinterpret_cast<void**>(top);
  words[-1] = nullptr;                             // entry's return address: never used
  words[-2] = reinterpret_cast<void*>(entry);      // where the first switch's ret goes
  for (int r = 3; r <= 8; ++r) words[-r] = nullptr;  // rbp, rbx, r12-r15
  c->sp = &words[-8];
}

void switch_context(Context* save, Context* load) { emu_switch_stack(&save->sp, load->sp); }
#else
struct Context {
  ucontext_t uc;
};

void new_stack(Context* c, void* base, size_t bytes, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = base;
  c->uc.uc_stack.ss_size = bytes;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}

void switch_context(Context* save, Context* load) { swapcontext(&save->uc, &load->uc); }
#endif

struct Fiber {
  Context context;
  void* stack = nullptr;
  uint3 tid{};
  int linear = 0;
  State state = State::Runnable;
  unsigned wait_mask = 0;       // lanes a warp barrier waits for
  unsigned char slot[16] = {};  // this lane's value in the current warp exchange
};

namespace {

struct Grid {
  std::string where;
  uint3 block{};
  dim3 block_dim, grid_dim;
  std::vector<unsigned char> shared;
  std::vector<Fiber*> fibers;
  const std::function<void()>* body = nullptr;
  std::string error;
  uint64_t block_serial = 0;
  int opted_shared = -1;  // the kernel's cudaFuncSetAttribute limit on dynamic shared memory, -1: none
  std::unordered_set<void*> statics;  // the static __shared__ arrays its threads reached
  size_t static_bytes = 0;
};

std::mutex launch_mutex;  // one emulated launch at a time
Context scheduler;
Fiber* running = nullptr;
Grid* grid = nullptr;
std::vector<std::unique_ptr<Fiber>> pool;
std::unordered_map<const void*, int> max_dynamic_shared;
std::unordered_map<void*, uint64_t> poisoned_at;
uint64_t block_counter = 0;
uint32_t next_kernels = 0;  // the IDD_OPS_CUDA_NEXT groups on, a bit each
int64_t order_seed = 0;
int64_t launch_count = 0;
// The launch count at the last configure: each launch's order comes from the seed and the launches
// since, so a call run again under the same configure (a fuzzer's --repro) gets the same orders
// whatever ran before it in the process (with the process-wide count, a case's float atomics
// rounded otherwise after other cases, and --repro could not show what a long run had seen).
int64_t configured_at = 0;
std::map<std::string, std::pair<int64_t, double>> launch_times;  // site -> (launches, seconds)
std::vector<int64_t> launch_log;

Fiber* fiber(int i) {
  while (static_cast<int>(pool.size()) <= i) {
    auto f = std::make_unique<Fiber>();
    f->stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (f->stack == MAP_FAILED) throw std::runtime_error("emu: no memory for a thread's stack");
    pool.push_back(std::move(f));
  }
  return pool[i].get();
}

void yield_to_scheduler() { switch_context(&running->context, &scheduler); }

// Keeps the launch's first error, prefixed with the running thread's block and thread.
void record_error(const std::string& message) {
  if (grid->error.empty()) {
    std::ostringstream out;
    out << grid->where << ": block (" << grid->block.x << "," << grid->block.y << "," << grid->block.z
        << ") thread (" << running->tid.x << "," << running->tid.y << "," << running->tid.z << "): " << message;
    grid->error = out.str();
  }
}

void fail(const std::string& message) {
  record_error(message);
  throw std::runtime_error(grid->error);
}

void fiber_main() {
  try {
    (*grid->body)();
  } catch (const std::exception& e) {
    if (grid->error.empty()) grid->error = grid->where + ": " + e.what();
  }
  running->state = State::Done;
  switch_context(&running->context, &scheduler);
}

int warp_base(const Fiber* f) { return f->linear & ~31; }

// Whether every live lane of `mask` in f's warp waits at a warp barrier (an exited lane named in
// the mask is an error, as on a GPU where the call would hang or read garbage).
bool warp_ready(const Fiber* f, std::string* why) {
  const int base = warp_base(f);
  const int n = static_cast<int>(grid->fibers.size());
  for (int lane = 0; lane < 32; ++lane) {
    if (!(f->wait_mask >> lane & 1u)) continue;
    if (base + lane >= n) {
      *why = "a warp operation names lane " + std::to_string(lane) + ", past the block's last thread";
      return false;
    }
    const Fiber* g = grid->fibers[base + lane];
    if (g->state == State::Done) {
      *why = "a warp operation names lane " + std::to_string(lane) + ", which has exited";
      return false;
    }
    if (g->state != State::AtWarpBarrier) return false;
  }
  return true;
}

void run_block(std::mt19937_64& rng) {
  const int n = static_cast<int>(grid->fibers.size());
  ++block_counter;
  std::fill(grid->shared.begin(), grid->shared.end(), 0xFF);
  for (int i = 0; i < n; ++i) {
    Fiber* f = grid->fibers[i];
    f->state = State::Runnable;
    new_stack(&f->context, f->stack, kStackBytes, fiber_main);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    for (int i : order) {
      Fiber* f = grid->fibers[i];
      if (f->state != State::Runnable) continue;
      running = f;
      memory::enter_thread(f->linear, f->stack, kStackBytes);
      switch_context(&scheduler, &f->context);
      memory::leave_thread();
      running = nullptr;
      progressed = true;
      if (!grid->error.empty()) throw std::runtime_error(grid->error);
    }
    // Open the barriers whose threads have all arrived.
    int live = 0, at_block = 0;
    for (Fiber* f : grid->fibers) {
      live += f->state != State::Done;
      at_block += f->state == State::AtBlockBarrier;
    }
    if (live == 0) return;
    bool opened = false;
    if (at_block == live) {
      for (Fiber* f : grid->fibers)
        if (f->state == State::AtBlockBarrier) f->state = State::Runnable;
      opened = true;
    }
    std::string why;
    std::vector<Fiber*> ready;
    for (Fiber* f : grid->fibers) {
      if (f->state != State::AtWarpBarrier) continue;
      if (warp_ready(f, &why)) ready.push_back(f);
      if (!why.empty()) {
        running = f;
        grid->error = grid->where + ": thread " + std::to_string(f->linear) + ": " + why;
        throw std::runtime_error(grid->error);
      }
    }
    for (Fiber* f : ready) f->state = State::Runnable;
    opened = opened || !ready.empty();
    if (!progressed && !opened) {
      std::ostringstream out;
      out << grid->where << ": block (" << grid->block.x << "," << grid->block.y << "," << grid->block.z
          << ") deadlocks: " << at_block << " of " << live
          << " live threads wait at __syncthreads, the others at a warp operation (a barrier not every thread "
             "reaches)";
      throw std::runtime_error(out.str());
    }
  }
}

}  // namespace

uint3 thread_idx() { return running->tid; }
uint3 block_idx() { return grid->block; }
dim3 block_dim() { return grid->block_dim; }
dim3 grid_dim() { return grid->grid_dim; }
void* dynamic_shared() { return grid->shared.empty() ? nullptr : grid->shared.data(); }
int lane_id() { return running->linear & 31; }

void sync_block() {
  running->state = State::AtBlockBarrier;
  yield_to_scheduler();
}

void start_exchange(unsigned mask, const void* value, size_t bytes) {
  if (!(mask >> lane_id() & 1u)) fail("a warp operation's mask leaves out its own lane");
  if (bytes > sizeof(running->slot)) fail("a warp exchange of more than 16 bytes");
  memory::collective();
  if (bytes) std::memcpy(running->slot, value, bytes);
  running->wait_mask = mask;
  running->state = State::AtWarpBarrier;
  yield_to_scheduler();
}

void read_lane(unsigned mask, int lane, void* out, size_t bytes) {
  if (lane < 0 || lane >= 32) fail("a shuffle reads lane " + std::to_string(lane));
  if (!(mask >> lane & 1u)) {
    // CUDA leaves the value undefined when the source lane is outside the mask.
    fail("a shuffle reads lane " + std::to_string(lane) + ", outside its mask");
  }
  const Fiber* src = grid->fibers[warp_base(running) + lane];
  std::memcpy(out, src->slot, bytes);
}

void finish_exchange(unsigned mask) {
  running->wait_mask = mask;
  running->state = State::AtWarpBarrier;
  yield_to_scheduler();
}

unsigned vote(unsigned mask, bool predicate) {
  const unsigned char p = predicate;
  start_exchange(mask, &p, 1);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1u && grid->fibers[warp_base(running) + lane]->slot[0]) bits |= 1u << lane;
  finish_exchange(mask);
  return bits;
}

namespace {

// CUDA's rule for a block's shared memory, static and dynamic together: at most 48 KiB unless
// the kernel opted in, and an opt-in limit that leaves room for the static arrays (else
// cudaFuncSetAttribute fails). The static size is known here once a thread reaches each array.
void check_static_shared(void* p, size_t bytes) {
  if (!grid->statics.insert(p).second) return;
  grid->static_bytes += bytes;
  const size_t statics = grid->static_bytes, dynamic = grid->shared.size();
  if (grid->opted_shared < 0 && statics + dynamic > kDefaultShared)
    fault(std::to_string(statics) + " bytes of static and " + std::to_string(dynamic) +
          " of dynamic shared memory, more than the " + std::to_string(kDefaultShared) +
          " a block may use together without cudaFuncSetAttribute");
  if (grid->opted_shared >= 0 && statics + static_cast<size_t>(grid->opted_shared) > kOptinShared)
    fault(std::to_string(statics) + " bytes of static shared memory and an opt-in limit of " +
          std::to_string(grid->opted_shared) + " dynamic bytes, more than the " + std::to_string(kOptinShared) +
          " a block may have (cudaFuncSetAttribute would fail)");
}

}  // namespace

void poison_shared(void* p, size_t bytes) {
  check_static_shared(p, bytes);
  auto& at = poisoned_at[p];
  if (at == block_counter) return;
  at = block_counter;
  std::memset(p, 0xFF, bytes);
  memory::add_static_shared(p, bytes);
}

void fault(const std::string& message) {
  record_error(message);
  running->state = State::Done;  // never resumed: the scheduler raises grid->error
  switch_context(&running->context, &scheduler);
  __builtin_unreachable();
}

void device_assert(const char* condition, const char* file, int line) {
  fail(std::string("device assert failed: ") + condition + " (" + file + ":" + std::to_string(line) + ")");
}

void set_max_dynamic_shared(const void* kernel, int bytes) { max_dynamic_shared[kernel] = bytes; }

void run_grid(const char* where, const void* kernel, dim3 grid_dim, dim3 block_dim, size_t shared,
              const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const std::string site = std::string("emulated launch at ") + where;
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  if (threads == 0 || threads > kMaxThreads || block_dim.z > 64)
    throw std::runtime_error(site + ": a block of " + std::to_string(threads) + " threads (CUDA allows 1 to 1024)");
  if (grid_dim.x == 0 || grid_dim.y == 0 || grid_dim.z == 0 || grid_dim.x > 2147483647u || grid_dim.y > 65535 ||
      grid_dim.z > 65535)
    throw std::runtime_error(site + ": grid (" + std::to_string(grid_dim.x) + "," + std::to_string(grid_dim.y) + "," +
                             std::to_string(grid_dim.z) + ") is empty or past CUDA's limits");
  auto opted = max_dynamic_shared.find(kernel);
  const size_t allowed = opted == max_dynamic_shared.end() ? kDefaultShared : static_cast<size_t>(opted->second);
  if (shared > allowed)
    throw std::runtime_error(site + ": " + std::to_string(shared) + " bytes of dynamic shared memory, more than the " +
                             std::to_string(allowed) + " the kernel may use (cudaFuncSetAttribute raises the limit)");
  ++launch_count;
  launch_log.insert(launch_log.end(), {static_cast<int64_t>(uint64_t{grid_dim.x} * grid_dim.y * grid_dim.z),
                                      static_cast<int64_t>(threads), static_cast<int64_t>(shared)});
  Grid g;
  g.where = site;
  g.block_dim = block_dim;
  g.grid_dim = grid_dim;
  g.shared.assign(shared, 0xFF);
  g.opted_shared = opted == max_dynamic_shared.end() ? -1 : opted->second;
  g.body = &body;
  for (unsigned i = 0; i < threads; ++i) {
    Fiber* f = fiber(static_cast<int>(i));
    f->linear = static_cast<int>(i);
    f->tid = uint3{i % block_dim.x, i / block_dim.x % block_dim.y, i / (block_dim.x * block_dim.y)};
    g.fibers.push_back(f);
  }
  const uint64_t blocks = uint64_t{grid_dim.x} * grid_dim.y * grid_dim.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  const auto since_configure = static_cast<uint64_t>(launch_count - configured_at);
  std::mt19937_64 rng(static_cast<uint64_t>(order_seed) * 1000003u + since_configure);
  std::shuffle(order.begin(), order.end(), rng);
  grid = &g;
  memory::begin_launch(where, grid_dim, static_cast<int>(threads),
                       g.shared.data(), g.shared.size());
  const auto t0 = std::chrono::steady_clock::now();
  auto& timing = launch_times[where];
  ++timing.first;
  try {
    for (uint64_t b : order) {
      g.block = uint3{static_cast<unsigned>(b % grid_dim.x), static_cast<unsigned>(b / grid_dim.x % grid_dim.y),
                      static_cast<unsigned>(b / (uint64_t{grid_dim.x} * grid_dim.y))};
      memory::begin_block(b);
      run_block(rng);
      memory::end_block();
    }
  } catch (...) {
    grid = nullptr;
    throw;
  }
  grid = nullptr;
  memory::end_launch();
  timing.second += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string profile() {
  std::ostringstream out;
  for (const auto& [site, t] : launch_times) out << site << "\t" << t.first << "\t" << t.second << "\n";
  return out.str();
}

uint32_t next_groups() { return next_kernels; }
void set_next_groups(uint32_t groups) { next_kernels = groups; }
void configure(bool cuda_next, int64_t seed) {
  next_kernels = cuda_next ? ~0u : 0u;
  order_seed = seed;
  configured_at = launch_count;
}
int64_t launches() { return launch_count; }
std::vector<int64_t> take_launch_log() { return std::exchange(launch_log, {}); }

}  // namespace emu
