// The memory model behind memory_model.h, and the sanitizer hooks that feed it. Compiled without
// instrumentation (build.py builds it into the emulator's runtime library with emu.cpp).
#include "memory_model.h"

#include <pthread.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace emu::memory {

namespace {

struct Range {
  uintptr_t lo = 0, hi = 0;
  bool contains(uintptr_t a) const { return a >= lo && a < hi; }
};

Range range(const void* p, size_t bytes) {
  const auto lo = reinterpret_cast<uintptr_t>(p);
  return Range{lo, lo + bytes};
}

int current_mode = kRaces;
// A kernel thread runs on this OS thread and the mode is not 0: the hooks' one test. Per OS
// thread, so instrumented host code another thread runs meanwhile is not counted.
__attribute__((tls_model("initial-exec"))) thread_local bool tracking = false;
bool inside = false;  // in access(): what its own calls might reach of instrumented code is not counted

struct Launch {
  std::string where;
  dim3 grid;
  int threads = 0;
  Range host_stack, dynamic_shared, stack;
  uint64_t block = 0;
  int thread = -1;
} launch;

std::map<uintptr_t, uintptr_t> static_shared;  // start -> end of every static __shared__ array

bool is_shared(uintptr_t a) {
  if (launch.dynamic_shared.contains(a)) return true;
  auto it = static_shared.upper_bound(a);
  return it != static_shared.begin() && a < std::prev(it)->second;
}

// ---- Redzones around allocations: start -> (end, the allocation's data start and size).
struct Redzone {
  uintptr_t end, data;
  size_t bytes;
};
// Never destroyed: tensors are still freed while the process exits.
std::mutex& redzones_mutex = *new std::mutex;  // allocations come and go on any thread
std::map<uintptr_t, Redzone>& redzones = *new std::map<uintptr_t, Redzone>;

// ---- Races between blocks. Per global byte, the block that last wrote it ((block << 1) | 1 when
// the write was atomic; -1: none), the block that read it (-1: none; -2: more than one), and the
// writer's count of global writes before that write (its ordinal, for the release rule below).
struct Shadow {
  int32_t writer = -1, reader = -1;
  uint32_t ordinal = 0;
};
constexpr int kPageBits = 12;
std::unordered_map<uintptr_t, std::unique_ptr<Shadow[]>> shadow_pages;
uintptr_t last_page = ~uintptr_t{0};
Shadow* last_shadow = nullptr;

Shadow& shadow(uintptr_t a) {
  const uintptr_t page = a >> kPageBits;
  if (page != last_page) {
    auto& slot = shadow_pages[page];
    if (!slot) slot = std::make_unique<Shadow[]>(size_t{1} << kPageBits);
    last_page = page;
    last_shadow = slot.get();
  }
  return last_shadow[a & ((uintptr_t{1} << kPageBits) - 1)];
}

// Release and acquire (memory_model.h). Per block: its global writes so far, the count at its
// last fence (-1: none yet), the writes it has taken from other blocks' releases by an atomic not
// yet followed by its own fence (pending), and those after one (acquired: block -> its writes
// with ordinal below this are visible). Per atomic address: the releases made there, in order.
struct BlockOrder {
  uint32_t writes = 0;
  int64_t fenced = -1;
  std::unordered_map<int32_t, uint32_t> pending, acquired;
} order;
std::unordered_map<uintptr_t, std::vector<std::pair<int32_t, uint32_t>>> releases;

void take_up_to(std::unordered_map<int32_t, uint32_t>& into, int32_t block, uint32_t upto) {
  uint32_t& have = into[block];
  have = std::max(have, upto);
}

// The running block's atomic on a: releases its fenced writes there and takes the releases
// before it (visible once it fences).
void release_and_take(uintptr_t a, int32_t me) {
  auto& here = releases[a];
  for (const auto& [block, upto] : here)
    if (block != me) take_up_to(order.pending, block, upto);
  if (order.fenced >= 0) here.emplace_back(me, static_cast<uint32_t>(order.fenced));
}

bool visible(int32_t writer, uint32_t ordinal) {
  const auto it = order.acquired.find(writer);
  return it != order.acquired.end() && ordinal < it->second;
}

std::string block_name(int64_t linear) {
  if (linear < 0) return "other blocks";
  const uint64_t b = static_cast<uint64_t>(linear);
  std::ostringstream out;
  out << "block (" << b % launch.grid.x << "," << b / launch.grid.x % launch.grid.y << ","
      << b / (uint64_t{launch.grid.x} * launch.grid.y) << ")";
  return out.str();
}

const char* verb(Kind kind) { return kind == Kind::Read ? "reads" : kind == Kind::Write ? "writes" : "updates atomically"; }

void check_bounds(uintptr_t a, size_t bytes, Kind kind) {
  std::unique_lock<std::mutex> lock(redzones_mutex);
  auto it = redzones.upper_bound(a + bytes - 1);
  if (it == redzones.begin()) return;
  --it;
  if (a >= it->second.end) return;
  const Redzone z = it->second;
  lock.unlock();
  std::ostringstream out;
  const auto offset = static_cast<int64_t>(a) - static_cast<int64_t>(z.data);
  out << "an access outside its allocation: this thread " << verb(kind) << " " << bytes << " bytes at offset "
      << offset << " of a " << z.bytes << "-byte allocation ("
      << (offset < 0 ? std::to_string(-offset) + " bytes before its start"
                     : std::to_string(offset - static_cast<int64_t>(z.bytes)) + " bytes past its end")
      << "), where a GPU reads or writes another allocation or faults";
  inside = false;
  fault(out.str());  // ends the thread: access() does not return
}

void check_race(uintptr_t a, size_t bytes, Kind kind) {
  const auto me = static_cast<int32_t>(launch.block);
  for (size_t i = 0; i < bytes; ++i) {
    Shadow& s = shadow(a + i);
    const int32_t writer = s.writer < 0 ? -1 : s.writer >> 1;
    const bool writer_atomic = s.writer >= 0 && (s.writer & 1);
    int64_t other = -1;
    const char* what = nullptr;
    if (writer >= 0 && writer != me && !(kind == Kind::Atomic && writer_atomic) && !visible(writer, s.ordinal)) {
      other = writer;
      what = writer_atomic ? "updated atomically" : "wrote";
    } else if (kind != Kind::Read && s.reader != -1 && s.reader != me) {
      other = s.reader;
      what = "read";
    }
    if (what) {
      std::ostringstream out;
      out << "a race between blocks: this thread " << verb(kind) << " a global byte (" << bytes << "-byte access at "
          << reinterpret_cast<const void*>(a) << ") that " << block_name(other) << " " << what
          << " in the same launch, and CUDA runs blocks in no promised order";
      inside = false;
      fault(out.str());  // ends the thread: access() does not return
    }
    if (kind == Kind::Read) {
      s.reader = s.reader == -1 || s.reader == me ? me : -2;
    } else {
      s.writer = me << 1 | (kind == Kind::Atomic ? 1 : 0);
      s.ordinal = order.writes;
    }
  }
  if (kind == Kind::Atomic) release_and_take(a, me);
  if (kind != Kind::Read) ++order.writes;
}

// ---- The traffic model. Each thread's accesses are numbered per instruction (the k-th time a
// thread reaches pc); the lanes of a warp that reach one instruction the same number of times
// form one warp request, as on a GPU where the warp issues it once for its active lanes.
struct Record {
  uintptr_t pc;
  uint32_t k;
  uint16_t thread;
  uint32_t bytes;
  Kind kind;
  bool shared;
  bool floating;
  uintptr_t addr;
};
std::vector<Record> records;                         // this block's accesses
std::unordered_map<uint64_t, uint32_t> occurrences;  // (pc << 10 | thread) -> times reached

struct Counts {
  uint64_t ld_requests = 0, ld_sectors = 0, ld_bytes = 0;
  uint64_t st_requests = 0, st_sectors = 0, st_bytes = 0;
  uint64_t atomics = 0, float_atomics = 0;
  uint64_t sh_requests = 0, sh_wavefronts = 0, sh_atomics = 0;
  uint64_t collective_lanes = 0, sh_least_wavefronts = 0;
} counts;
std::unordered_set<uintptr_t> read_sectors, written_sectors;
std::ostringstream log;

constexpr int kSectorBits = 5;  // 32-byte sectors

// Global: the distinct sectors one warp request touches.
uint64_t sectors(const Record* first, const Record* last) {
  std::vector<uintptr_t> s;
  for (const Record* r = first; r != last; ++r)
    for (uintptr_t x = r->addr >> kSectorBits; x <= (r->addr + r->bytes - 1) >> kSectorBits; ++x) s.push_back(x);
  std::sort(s.begin(), s.end());
  return static_cast<uint64_t>(std::unique(s.begin(), s.end()) - s.begin());
}

// Shared: the passes one warp request takes. 32 banks of 4-byte words; lanes that read one word
// share it, distinct words in one bank serialise, and a pass serves at most 128 bytes. 8-byte
// accesses are served a half warp at a time, 16-byte ones a quarter warp at a time.
uint64_t wavefronts(const Record* first, const Record* last) {
  const int phase_lanes = first->bytes >= 16 ? 8 : first->bytes >= 8 ? 16 : 32;
  uint64_t passes = 0;
  for (int phase = 0; phase < 32 / phase_lanes; ++phase) {
    std::vector<uintptr_t> words;
    for (const Record* r = first; r != last; ++r)
      if (r->thread % 32 / phase_lanes == phase)
        for (uintptr_t w = r->addr >> 2; w <= (r->addr + r->bytes - 1) >> 2; ++w) words.push_back(w);
    if (words.empty()) continue;
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    uint64_t per_bank[32] = {};
    for (uintptr_t w : words) ++per_bank[w % 32];
    const uint64_t worst = *std::max_element(per_bank, per_bank + 32);
    passes += std::max<uint64_t>(worst, (words.size() * 4 + 127) / 128);
  }
  return passes;
}

// The distinct bytes one warp request asks for (lanes that read the same word share it).
uint64_t distinct_bytes(const Record* first, const Record* last) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const Record* r = first; r != last; ++r) spans.emplace_back(r->addr, r->addr + r->bytes);
  std::sort(spans.begin(), spans.end());
  uint64_t bytes = 0;
  uintptr_t end = 0;
  for (auto [lo, hi] : spans) {
    lo = std::max(lo, end);
    if (hi > lo) bytes += hi - lo;
    end = std::max(end, hi);
  }
  return bytes;
}

void count_request(const Record* first, const Record* last) {
  const uint64_t lanes = static_cast<uint64_t>(last - first);
  if (first->shared) {
    if (first->kind == Kind::Atomic) counts.sh_atomics += lanes;
    ++counts.sh_requests;
    counts.sh_wavefronts += wavefronts(first, last);
    counts.sh_least_wavefronts += std::max<uint64_t>(1, (distinct_bytes(first, last) + 127) / 128);
    return;
  }
  switch (first->kind) {
    case Kind::Read:
      ++counts.ld_requests;
      counts.ld_sectors += sectors(first, last);
      counts.ld_bytes += distinct_bytes(first, last);
      break;
    case Kind::Write:
      ++counts.st_requests;
      counts.st_sectors += sectors(first, last);
      counts.st_bytes += distinct_bytes(first, last);
      break;
    case Kind::Atomic:
      counts.atomics += lanes;
      if (first->floating) counts.float_atomics += lanes;
      break;
  }
}

void record(uintptr_t a, size_t bytes, Kind kind, bool shared, bool floating, const void* pc) {
  const auto p = reinterpret_cast<uintptr_t>(pc);
  const uint32_t k = occurrences[p << 10 | static_cast<uint64_t>(launch.thread)]++;
  records.push_back(Record{p, k, static_cast<uint16_t>(launch.thread), static_cast<uint32_t>(bytes),
                           kind, shared, floating, a});
  if (shared) return;
  for (uintptr_t x = a >> kSectorBits; x <= (a + bytes - 1) >> kSectorBits; ++x) {
    if (kind != Kind::Write) read_sectors.insert(x);
    if (kind != Kind::Read) written_sectors.insert(x);
  }
}

}  // namespace

int set_mode(int mode) { return std::exchange(current_mode, mode); }

void guard(const void* data, size_t bytes, size_t redzone) {
  const auto lo = reinterpret_cast<uintptr_t>(data);
  const std::lock_guard<std::mutex> lock(redzones_mutex);
  redzones[lo - redzone] = Redzone{lo, lo, bytes};
  redzones[lo + bytes] = Redzone{lo + bytes + redzone, lo, bytes};
}

void unguard(const void* data, size_t bytes, size_t redzone) {
  const auto lo = reinterpret_cast<uintptr_t>(data);
  const std::lock_guard<std::mutex> lock(redzones_mutex);
  redzones.erase(lo - redzone);
  redzones.erase(lo + bytes);
}

void begin_launch(const char* where, dim3 grid, int threads, const void* shared, size_t shared_bytes) {
  launch = Launch{};
  inside = false;
  launch.where = where;
  launch.grid = grid;
  launch.threads = threads;
  launch.dynamic_shared = range(shared, shared_bytes);
  static thread_local Range host_stack = [] {  // the launching thread's stack, asked once
    Range r;
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      void* base = nullptr;
      size_t size = 0;
      pthread_attr_getstack(&attr, &base, &size);
      r = range(base, size);
      pthread_attr_destroy(&attr);
    }
    return r;
  }();
  launch.host_stack = host_stack;
  shadow_pages.clear();
  last_page = ~uintptr_t{0};
  releases.clear();
  counts = Counts{};
  read_sectors.clear();
  written_sectors.clear();
}

void end_launch() {
  if (!(current_mode & kTraffic)) return;
  const uint64_t blocks = uint64_t{launch.grid.x} * launch.grid.y * launch.grid.z;
  const Counts& c = counts;
  log << launch.where << "\t" << blocks << "\t" << launch.threads << "\t" << c.ld_requests << "\t" << c.ld_sectors
      << "\t" << c.ld_bytes << "\t" << c.st_requests << "\t" << c.st_sectors << "\t" << c.st_bytes << "\t"
      << c.atomics << "\t" << c.float_atomics << "\t" << (read_sectors.size() << kSectorBits) << "\t"
      << (written_sectors.size() << kSectorBits) << "\t" << c.sh_requests << "\t" << c.sh_wavefronts << "\t"
      << c.sh_atomics << "\t" << (c.collective_lanes + 31) / 32 << "\t" << c.sh_least_wavefronts << "\n";
}

void begin_block(uint64_t block) {
  launch.block = block;
  order = BlockOrder{};
  records.clear();
  occurrences.clear();
}

void end_block() {
  if (!(current_mode & kTraffic)) return;
  std::sort(records.begin(), records.end(), [](const Record& a, const Record& b) {
    return std::make_tuple(a.thread / 32, a.pc, a.k, a.kind, a.shared) <
           std::make_tuple(b.thread / 32, b.pc, b.k, b.kind, b.shared);
  });
  for (size_t i = 0; i < records.size();) {
    size_t j = i + 1;
    const Record& r = records[i];
    while (j < records.size() && records[j].thread / 32 == r.thread / 32 && records[j].pc == r.pc &&
           records[j].k == r.k && records[j].kind == r.kind && records[j].shared == r.shared)
      ++j;
    count_request(&records[i], records.data() + j);
    i = j;
  }
  records.clear();
}

void enter_thread(int linear, const void* stack, size_t stack_bytes) {
  launch.thread = linear;
  launch.stack = range(stack, stack_bytes);
  tracking = current_mode != 0;
}

void leave_thread() {
  tracking = false;
  launch.thread = -1;
}

void collective() {
  if (tracking && (current_mode & kTraffic)) ++counts.collective_lanes;
}

void add_static_shared(const void* p, size_t bytes) {
  const auto lo = reinterpret_cast<uintptr_t>(p);
  static_shared[lo] = lo + bytes;
}

void access(const void* p, size_t bytes, Kind kind, bool floating, const void* pc) {
  if (!tracking || inside || bytes == 0) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (launch.stack.contains(a) || launch.host_stack.contains(a)) return;  // a thread's locals
  inside = true;
  const bool shared = is_shared(a);
  if (!shared && (current_mode & kRaces)) {  // either may end the thread (fault)
    check_bounds(a, bytes, kind);
    check_race(a, bytes, kind);
  }
  if (current_mode & kTraffic) record(a, bytes, kind, shared, floating, pc);
  inside = false;
}

void fence() {
  if (!tracking) return;
  order.fenced = order.writes;
  for (const auto& [block, upto] : order.pending) take_up_to(order.acquired, block, upto);
  order.pending.clear();
}

std::string take_log() {
  std::string out = log.str();
  log.str("");
  return out;
}

}  // namespace emu::memory

namespace emu {

void vector_access(const void* p, size_t bytes, bool write, const void* pc) {
  memory::access(p, bytes, write ? memory::Kind::Write : memory::Kind::Read, false, pc);
}

void atomic_access(const void* p, size_t bytes, bool floating, const void* pc) {
  memory::access(p, bytes, memory::Kind::Atomic, floating, pc);
}

void fence() { memory::fence(); }

}  // namespace emu

// ---- The hooks GCC's -fsanitize=thread calls (the names and signatures of its runtime
// interface). Plain accesses feed the model; the atomics are the host code's (torch's reference
// counts) and only need doing.
using emu::memory::Kind;

#define EMU_HOOK(name, n, kind) \
  extern "C" void name(void* p) { emu::memory::access(p, n, kind, false, __builtin_return_address(0)); }
#define EMU_HOOKS(n)                                   \
  EMU_HOOK(__tsan_read##n, n, Kind::Read)              \
  EMU_HOOK(__tsan_write##n, n, Kind::Write)            \
  EMU_HOOK(__tsan_unaligned_read##n, n, Kind::Read)    \
  EMU_HOOK(__tsan_unaligned_write##n, n, Kind::Write)  \
  EMU_HOOK(__tsan_volatile_read##n, n, Kind::Read)     \
  EMU_HOOK(__tsan_volatile_write##n, n, Kind::Write)
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)

extern "C" {
void __tsan_read_range(void* p, size_t n) { emu::memory::access(p, n, Kind::Read, false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, size_t n) {
  emu::memory::access(p, n, Kind::Write, false, __builtin_return_address(0));
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}

#define EMU_ATOMICS(bits, T)                                                                                     \
  extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                                        \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                             \
  EMU_FETCH(bits, T, add)                                                                                       \
  EMU_FETCH(bits, T, sub)                                                                                       \
  EMU_FETCH(bits, T, and)                                                                                       \
  EMU_FETCH(bits, T, or)                                                                                        \
  EMU_FETCH(bits, T, xor)                                                                                       \
  EMU_FETCH(bits, T, nand)                                                                                      \
  extern "C" int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {            \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
  }                                                                                                             \
  extern "C" int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {              \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
  }                                                                                                             \
  extern "C" T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                  \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                            \
    return c;                                                                                                   \
  }
#define EMU_FETCH(bits, T, op)                                          \
  extern "C" T __tsan_atomic##bits##_fetch_##op(volatile T* a, T v, int) { \
    return __atomic_fetch_##op(a, v, __ATOMIC_SEQ_CST);                 \
  }
EMU_ATOMICS(8, unsigned char)
EMU_ATOMICS(16, unsigned short)
EMU_ATOMICS(32, unsigned int)
EMU_ATOMICS(64, unsigned long long)
