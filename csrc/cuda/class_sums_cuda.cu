// Per-image class sums of a feature map (class_sums, class_sums_pair) on CUDA: every feature
// element is read once, with 16-byte loads where the layout allows, and reduced in a fixed order
// without float atomics, so the sums have the same bits on every run.
//
// A block owns (image, channel tile, pixel segment) and writes its own sums: the image's
// [K, C-tile] block of the output, or of a per-segment partial when the pixels are split into
// segments (for enough blocks, or to bound the sequential part of each sum); one more small
// launch then adds the segments in order. Three strategies, by layout and K
// (K limits for float32 accumulation; float64 halves them):
//  P  NCHW, K <= 23: threads own private sums [K][2 channels] in shared memory, add each run of
//     equal slots in registers, and a warp per (class, channel) adds the 256 private sums.
//  W  NCHW, larger K (up to the GPU's shared-memory opt-in, about K = 6000): warps own private
//     sums; per chunk of 32 x VEC pixels the warp adds each class present by one butterfly.
//  L  channels_last, K <= 46 (16-byte lanes) or K <= 190 (one channel per lane): lanes own
//     channels and every pixel's class is warp-uniform; warps own private sums.
//     Larger K pays one NCHW copy and takes W.
// Selected from Python only under IDD_OPS_CUDA_NEXT=1 until a GPU has run it.
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPrivateThreads = 256;  // P's block
constexpr int kWarps = 4;             // W's and L's block: 4 warps
constexpr int kTile = 2;              // channels per block of P and W: one slot load serves both
constexpr int kLastUnroll = 4;        // pixels loaded ahead per lane in L
// Longest chain of sequential float additions into one accumulator (float32 error grows
// about linearly with it), and the fewest steps per thread that make a segment worth a block.
constexpr int kMaxSerial = 1024;
constexpr int kMinSteps = 4;
constexpr size_t kPrivateBudget = 48 * 1024;
constexpr size_t kLastBudget = 96 * 1024;

enum class Strategy { Private, Warp, Last };

// One feature map's pass; the pair op launches two in one grid.
struct SumsJob {
  const void* feats;     // [B, C, H, W] NCHW, or [B, H, W, C] memory for L
  const int16_t* slots;  // [B, HW]
  void* sums;            // acc_t [B, segs, K, C] (segs == 1: the output itself)
  int64_t* counts;       // [B, segs, K]
  int C, HW, tiles, segs, seg_len, blocks;
};

struct SumsJobs {
  SumsJob job[2];
  int K;
};

// The job of this block, and the block's place in it: image b, channel tile, pixels [p0, p1).
struct BlockWork {
  SumsJob j;
  int b, tile, seg, p0, p1;
};

__device__ __forceinline__ BlockWork block_work(const SumsJobs& jobs) {
  BlockWork w;
  int blk = blockIdx.x;
  const bool second = blk >= jobs.job[0].blocks;
  w.j = second ? jobs.job[1] : jobs.job[0];
  if (second) blk -= jobs.job[0].blocks;
  w.seg = blk % w.j.segs;
  const int rest = blk / w.j.segs;
  w.tile = rest % w.j.tiles;
  w.b = rest / w.j.tiles;
  w.p0 = w.seg * w.j.seg_len;
  w.p1 = min(w.j.HW, w.p0 + w.j.seg_len);
  return w;
}

template <typename acc_t>
__device__ __forceinline__ acc_t* block_sums(const BlockWork& w, int K) {
  return static_cast<acc_t*>(w.j.sums) + (static_cast<int64_t>(w.b) * w.j.segs + w.seg) * K * w.j.C;
}

__device__ __forceinline__ int64_t* block_counts(const BlockWork& w, int K) {
  return w.j.counts + (static_cast<int64_t>(w.b) * w.j.segs + w.seg) * K;
}

// P: NCHW, thread-private sums priv[k][t][thread] (conflict-free: a warp's lanes hit 32
// consecutive words).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kPrivateThreads) sums_private_kernel(const SumsJobs jobs) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = jobs.K, tid = threadIdx.x;
  acc_t* priv = reinterpret_cast<acc_t*>(smem);
  int* cnt = reinterpret_cast<int*>(priv + K * kTile * kPrivateThreads);
  const BlockWork w = block_work(jobs);
  const int C = w.j.C, HW = w.j.HW, c0 = w.tile * kTile;
  for (int e = tid; e < K * kTile * kPrivateThreads; e += kPrivateThreads) priv[e] = acc_t(0);
  for (int e = tid; e < K; e += kPrivateThreads) cnt[e] = 0;
  __syncthreads();

  const scalar_t* rows[kTile];
#pragma unroll
  for (int t = 0; t < kTile; ++t)  // a tile past C re-reads the last channel and drops it
    rows[t] = static_cast<const scalar_t*>(w.j.feats) + (static_cast<int64_t>(w.b) * C + min(c0 + t, C - 1)) * HW;
  const int16_t* slot = w.j.slots + static_cast<int64_t>(w.b) * HW;
  const bool counting = w.tile == 0;
  acc_t run[kTile] = {};
  int cur = -1, n = 0;
  auto flush = [&]() {
    if (cur < 0) return;
#pragma unroll
    for (int t = 0; t < kTile; ++t) priv[(cur * kTile + t) * kPrivateThreads + tid] += run[t];
    if (counting) atomicAdd(&cnt[cur], n);  // integers: the same total in any order
  };
  // p0 and p1 are multiples of VEC (VEC > 1 only when HW is), so every vector is whole
#pragma unroll 2
  for (int p = w.p0 + tid * VEC; p < w.p1; p += kPrivateThreads * VEC) {
    const Vec<int16_t, VEC> s = load_vec<int16_t, VEC>(slot + p);
    Vec<scalar_t, VEC> x[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) x[t] = load_vec<scalar_t, VEC>(rows[t] + p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (s.v[i] != cur) {
        flush();
        cur = s.v[i];
        n = 0;
#pragma unroll
        for (int t = 0; t < kTile; ++t) run[t] = acc_t(0);
      }
      ++n;
#pragma unroll
      for (int t = 0; t < kTile; ++t) run[t] += static_cast<acc_t>(x[t].v[i]);
    }
  }
  flush();
  __syncthreads();

  acc_t* out = block_sums<acc_t>(w, K);
  const int lane = tid % 32;
  for (int r = tid / 32; r < K * kTile; r += kPrivateThreads / 32) {  // one warp per (class, channel)
    const acc_t* row = priv + r * kPrivateThreads;
    acc_t v = acc_t(0);
#pragma unroll
    for (int i = 0; i < kPrivateThreads / 32; ++i) v += row[i * 32 + lane];
    v = warp_sum(v);
    const int c = c0 + r % kTile;
    if (lane == 0 && c < C) out[static_cast<int64_t>(r / kTile) * C + c] = v;
  }
  if (counting)
    for (int k = tid; k < K; k += kPrivateThreads) block_counts(w, K)[k] = cnt[k];
}

// W's step: adds v[t] of the lanes whose slot is k into the warp's sums of class k, for each
// class k present among the lanes (one butterfly per class and channel); `weight` pixels per lane.
template <typename acc_t>
__device__ __forceinline__ void add_warp_classes(int s, const acc_t (&v)[kTile], int weight, acc_t* priv, int* cnt,
                                                 bool counting) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned pending = __ballot_sync(kFull, s >= 0);
  while (pending) {  // warp-uniform: every lane sees the same ballots
    const int k = __shfl_sync(kFull, s, __ffs(pending) - 1);
    const bool mine = s == k;
    const unsigned peers = __ballot_sync(kFull, mine);
    pending &= ~peers;
    acc_t r[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) r[t] = warp_sum(mine ? v[t] : acc_t(0));
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < kTile; ++t) priv[(k * kWarps + warp) * kTile + t] += r[t];
      if (counting) atomicAdd(&cnt[k], weight * __popc(peers));
    }
  }
}

// W: NCHW, any K that fits: warp-private sums priv[k][warp][t]; each warp walks its own
// contiguous quarter of the segment in chunks of 32 x VEC pixels.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarps * 32) sums_warp_kernel(const SumsJobs jobs) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = jobs.K, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  acc_t* priv = reinterpret_cast<acc_t*>(smem);
  int* cnt = reinterpret_cast<int*>(priv + K * kWarps * kTile);
  const BlockWork w = block_work(jobs);
  const int C = w.j.C, HW = w.j.HW, c0 = w.tile * kTile;
  for (int e = tid; e < K * kWarps * kTile; e += kWarps * 32) priv[e] = acc_t(0);
  for (int e = tid; e < K; e += kWarps * 32) cnt[e] = 0;
  __syncthreads();

  const scalar_t* rows[kTile];
#pragma unroll
  for (int t = 0; t < kTile; ++t)
    rows[t] = static_cast<const scalar_t*>(w.j.feats) + (static_cast<int64_t>(w.b) * C + min(c0 + t, C - 1)) * HW;
  const int16_t* slot = w.j.slots + static_cast<int64_t>(w.b) * HW;
  const bool counting = w.tile == 0;
  constexpr int kChunk = 32 * VEC;
  const int quarter = ((w.p1 - w.p0 + kWarps - 1) / kWarps + kChunk - 1) / kChunk * kChunk;
  const int q0 = w.p0 + warp * quarter, q1 = min(w.p1, q0 + quarter);
  for (int q = q0; q < q1; q += kChunk) {  // warp-uniform trip count
    const int p = q + lane * VEC;
    Vec<int16_t, VEC> s;
    Vec<scalar_t, VEC> x[kTile];
    if (p < q1) {  // q1 is a multiple of VEC: the vector is whole
      s = load_vec<int16_t, VEC>(slot + p);
#pragma unroll
      for (int t = 0; t < kTile; ++t) x[t] = load_vec<scalar_t, VEC>(rows[t] + p);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        s.v[i] = -1;
#pragma unroll
        for (int t = 0; t < kTile; ++t) x[t].v[i] = scalar_t(0);
      }
    }
    bool uniform = true;
#pragma unroll
    for (int i = 1; i < VEC; ++i) uniform = uniform && s.v[i] == s.v[0];
    acc_t v[kTile];
    if (__all_sync(kFull, uniform)) {  // street labels: each lane's VEC pixels share a class
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        v[t] = acc_t(0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[t] += static_cast<acc_t>(x[t].v[i]);
      }
      add_warp_classes(s.v[0], v, VEC, priv, cnt, counting);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
#pragma unroll
        for (int t = 0; t < kTile; ++t) v[t] = static_cast<acc_t>(x[t].v[i]);
        add_warp_classes(s.v[i], v, 1, priv, cnt, counting);
      }
    }
  }
  __syncthreads();

  acc_t* out = block_sums<acc_t>(w, K);
  for (int e = tid; e < K * kTile; e += kWarps * 32) {
    const int k = e / kTile, c = c0 + e % kTile;
    acc_t v = acc_t(0);
#pragma unroll
    for (int u = 0; u < kWarps; ++u) v += priv[(k * kWarps + u) * kTile + e % kTile];
    if (c < C) out[static_cast<int64_t>(k) * C + c] = v;
  }
  if (counting)
    for (int k = tid; k < K; k += kWarps * 32) block_counts(w, K)[k] = cnt[k];
}

// L: channels_last, lanes own VEC consecutive channels of a 32 x VEC channel tile; a pixel's
// class is the same for the whole warp. Warp-private sums priv[k][warp][channel of the tile].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarps * 32) sums_last_kernel(const SumsJobs jobs) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanesC = 32 * VEC;
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = jobs.K, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  acc_t* priv = reinterpret_cast<acc_t*>(smem);
  int* cnt = reinterpret_cast<int*>(priv + K * kWarps * kLanesC);
  const BlockWork w = block_work(jobs);
  const int C = w.j.C, HW = w.j.HW, c = w.tile * kLanesC + lane * VEC;
  for (int e = tid; e < K * kWarps * kLanesC; e += kWarps * 32) priv[e] = acc_t(0);
  for (int e = tid; e < K; e += kWarps * 32) cnt[e] = 0;
  __syncthreads();

  const bool active = c < C;  // C is a multiple of VEC: a lane's vector is whole or absent
  const scalar_t* img = static_cast<const scalar_t*>(w.j.feats) + static_cast<int64_t>(w.b) * HW * C + c;
  const int16_t* slot = w.j.slots + static_cast<int64_t>(w.b) * HW;
  const bool counting = w.tile == 0 && lane == 0;
  const int quarter = (w.p1 - w.p0 + kWarps - 1) / kWarps;
  const int q0 = w.p0 + warp * quarter, q1 = min(w.p1, q0 + quarter);
  acc_t run[VEC] = {};
  int cur = -1, n = 0;
  auto flush = [&]() {
    if (cur < 0) return;
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) priv[(cur * kWarps + warp) * kLanesC + lane * VEC + i] += run[i];
    }
    if (counting) atomicAdd(&cnt[cur], n);
  };
  for (int q = q0; q < q1; q += kLastUnroll) {
    int s[kLastUnroll];
    Vec<scalar_t, VEC> x[kLastUnroll];
#pragma unroll
    for (int u = 0; u < kLastUnroll; ++u) {  // loads first, so several are in flight
      s[u] = q + u < q1 ? slot[q + u] : -2;
      if (active && q + u < q1) x[u] = load_vec<scalar_t, VEC>(img + static_cast<int64_t>(q + u) * C);
    }
#pragma unroll
    for (int u = 0; u < kLastUnroll; ++u) {
      if (s[u] == -2) break;
      if (s[u] != cur) {
        flush();
        cur = s[u];
        n = 0;
#pragma unroll
        for (int i = 0; i < VEC; ++i) run[i] = acc_t(0);
      }
      ++n;
      if (active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) run[i] += static_cast<acc_t>(x[u].v[i]);
      }
    }
  }
  flush();
  __syncthreads();

  acc_t* out = block_sums<acc_t>(w, K);
  const int c_first = w.tile * kLanesC;
  for (int e = tid; e < K * kLanesC; e += kWarps * 32) {
    const int k = e / kLanesC, cl = e % kLanesC;
    acc_t v = acc_t(0);
#pragma unroll
    for (int u = 0; u < kWarps; ++u) v += priv[(k * kWarps + u) * kLanesC + cl];
    if (c_first + cl < C) out[static_cast<int64_t>(k) * C + c_first + cl] = v;
  }
  if (w.tile == 0)
    for (int k = tid; k < K; k += kWarps * 32) block_counts(w, K)[k] = cnt[k];
}

// The segments' partial sums and counts of up to two jobs, added in segment order.
struct Combine {
  const void* partial[2];
  const int64_t* partial_counts[2];
  void* sums[2];
  int64_t* counts[2];
  int64_t rows[2];  // B * K of each job (0: nothing to combine)
  int segs[2], C[2], K;
};

template <typename acc_t>
__global__ void combine_segments_kernel(const Combine cb) {
  const int64_t total0 = cb.rows[0] * (cb.C[0] + 1), total = total0 + cb.rows[1] * (cb.C[1] + 1);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = e < total0 ? 0 : 1;
    const int64_t i = j == 0 ? e : e - total0, C1 = cb.C[j] + 1;
    // (b, k, c) is one output element; c == C stands for the count of (b, k)
    const int64_t row = i / C1, c = i % C1, b = row / cb.K, k = row % cb.K;
    const int segs = cb.segs[j];
    if (c < cb.C[j]) {
      const acc_t* part = static_cast<const acc_t*>(cb.partial[j]) + (b * segs * cb.K + k) * cb.C[j] + c;
      acc_t v = acc_t(0);
      for (int s = 0; s < segs; ++s) v += part[static_cast<int64_t>(s) * cb.K * cb.C[j]];
      static_cast<acc_t*>(cb.sums[j])[row * cb.C[j] + c] = v;
    } else {
      const int64_t* part = cb.partial_counts[j] + b * segs * cb.K + k;
      int64_t v = 0;
      for (int s = 0; s < segs; ++s) v += part[static_cast<int64_t>(s) * cb.K];
      cb.counts[j][row] = v;
    }
  }
}

// ---- host ------------------------------------------------------------------------------

struct Plan {
  Strategy strategy;
  bool vec;  // 16-byte accesses
  int threads, tiles, unit;  // unit: pixels one accumulator takes per step
  size_t shared;
};

struct Pass {
  at::Tensor feats, slots, sums, counts, partial, partial_counts;
  Plan plan;
  SumsJob job;
};

bool channels_last_layout(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

Plan make_plan(const at::Tensor& feats, bool last, int64_t K) {
  const int64_t acc = feats.scalar_type() == at::kDouble ? 8 : 4, C = feats.size(1), HW = feats.size(2) * feats.size(3);
  const int vec = 16 / static_cast<int>(feats.element_size());
  if (last) {  // 16-byte lanes when they fit, else one channel per lane (the caller copies past that)
    bool v = C % vec == 0 && aligned16(feats.const_data_ptr());
    if (v && static_cast<size_t>(K * (kWarps * 32 * vec * acc + 4)) > kLastBudget) v = false;
    const int lanes_c = 32 * (v ? vec : 1);
    return {Strategy::Last, v, kWarps * 32, static_cast<int>((C + lanes_c - 1) / lanes_c), kWarps,
            static_cast<size_t>(K * (kWarps * lanes_c * acc + 4))};
  }
  // NCHW rows start 16-byte aligned when HW is a multiple of VEC and the base pointer is.
  const bool v = HW % vec == 0 && aligned16(feats.const_data_ptr());
  const int tiles = static_cast<int>((C + kTile - 1) / kTile);
  const size_t private_bytes = K * (kTile * kPrivateThreads * acc + 4);
  if (private_bytes <= kPrivateBudget) return {Strategy::Private, v, kPrivateThreads, tiles, kPrivateThreads, private_bytes};
  return {Strategy::Warp, v, kWarps * 32, tiles, kWarps * 32 * (v ? vec : 1),
          static_cast<size_t>(K * (kWarps * kTile * acc + 4))};
}

// Segments per (image, tile): enough blocks for two waves of resident blocks, no more than
// keeps kMinSteps steps per accumulator and the partials at 1/8 of the features, and at least
// enough to keep each accumulator's chain under kMaxSerial additions.
int segments(const Plan& plan, int64_t B, int64_t HW, int64_t K, int device) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  const int64_t resident = std::max<int64_t>(1, std::min<int64_t>(2048 / plan.threads, per_sm / (plan.shared + 1024)));
  const int64_t base = std::max<int64_t>(1, B * plan.tiles);
  const int64_t want = (2 * sms * resident + base - 1) / base;
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(HW / (int64_t{plan.unit} * kMinSteps), HW / (16 * K)));
  const int64_t needed = (HW + int64_t{plan.unit} * kMaxSerial - 1) / (int64_t{plan.unit} * kMaxSerial);
  return static_cast<int>(std::max<int64_t>({int64_t{1}, needed, std::min(want, cap)}));
}

Pass make_pass(const at::Tensor& feats_in, const at::Tensor& slots_in, int64_t K) {
  check_class_sums_inputs(feats_in, slots_in, K);
  const int64_t B = feats_in.size(0), C = feats_in.size(1), HW = feats_in.size(2) * feats_in.size(3);
  TORCH_CHECK_VALUE(C * HW < (int64_t{1} << 31) && B * C < (int64_t{1} << 31) && B * HW < (int64_t{1} << 31),
                    "feats: at most 2^31 - 1 elements per image, images times channels and images times pixels on "
                    "CUDA, got ", feats_in.sizes());
  Pass ps;
  const auto acc = acc_dtype(feats_in.scalar_type());
  ps.slots = slots_in.contiguous();
  if (!aligned16(ps.slots.const_data_ptr())) ps.slots = ps.slots.clone();  // vector loads of slots
  ps.feats = channels_last_layout(feats_in) ? feats_in : feats_in.contiguous();
  ps.plan = make_plan(ps.feats, channels_last_layout(ps.feats), K);
  if (ps.plan.strategy == Strategy::Last && ps.plan.shared > kLastBudget) {  // documented: one NCHW copy
    ps.feats = ps.feats.contiguous();
    ps.plan = make_plan(ps.feats, false, K);
  }
  const int device = feats_in.get_device();
  const int segs = B * HW * C == 0 ? 1 : segments(ps.plan, B, HW, K, device);
  const int vec = ps.plan.vec ? 16 / static_cast<int>(ps.feats.element_size()) : 1;
  const int64_t seg_len = ((HW + segs - 1) / segs + vec - 1) / vec * vec;
  ps.sums = at::empty({B, K, C}, ps.feats.options().dtype(acc));
  ps.counts = at::empty({B, K}, ps.feats.options().dtype(at::kLong));
  const int real_segs = HW == 0 ? 1 : static_cast<int>((HW + seg_len - 1) / seg_len);
  if (real_segs > 1) {
    ps.partial = at::empty({B, real_segs, K, C}, ps.sums.options());
    ps.partial_counts = at::empty({B, real_segs, K}, ps.counts.options());
  }
  const int64_t blocks = B * ps.plan.tiles * real_segs;
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 30), "feats: too many blocks for one launch (", blocks, ")");
  ps.job = {ps.feats.const_data_ptr(), ps.slots.const_data_ptr<int16_t>(),
            real_segs > 1 ? ps.partial.data_ptr() : ps.sums.data_ptr(),
            real_segs > 1 ? ps.partial_counts.data_ptr<int64_t>() : ps.counts.data_ptr<int64_t>(),
            static_cast<int>(C), static_cast<int>(HW), ps.plan.tiles, real_segs, static_cast<int>(seg_len),
            static_cast<int>(blocks)};
  return ps;
}

// Counts of slots [B, HW] for a map without channels (no block runs then).
at::Tensor counts_of_slots(const at::Tensor& slots, int64_t K) {
  at::Tensor idx = slots.reshape({slots.size(0), -1}).to(at::kLong);
  idx = at::where(idx >= 0, idx, at::full_like(idx, K));
  return at::zeros({slots.size(0), K + 1}, idx.options()).scatter_add_(1, idx, at::ones_like(idx)).narrow(1, 0, K)
      .contiguous();
}

template <typename scalar_t, int VEC>
void launch_sums(const Plan& plan, const SumsJobs& jobs, int blocks, int device, cudaStream_t stream) {
  auto kernel = plan.strategy == Strategy::Private ? sums_private_kernel<scalar_t, VEC>
                : plan.strategy == Strategy::Warp  ? sums_warp_kernel<scalar_t, VEC>
                                                   : sums_last_kernel<scalar_t, VEC>;
  allow_shared_memory(kernel, plan.shared, device, jobs.K);
  kernel<<<blocks, plan.threads, plan.shared, stream>>>(jobs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the passes' blocks: one grid for both when they share dtype and plan.
void run_passes(std::vector<Pass*> passes, int64_t K) {
  const int device = passes[0]->feats.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<Pass*> live;
  for (Pass* p : passes) {
    if (p->job.blocks > 0) live.push_back(p);
    else if (p->job.HW > 0 && p->job.C == 0) p->counts.copy_(counts_of_slots(p->slots, K));
    else p->counts.zero_();  // HW == 0 (then C * HW == 0 sums are empty or zero)
    if (p->job.blocks == 0) p->sums.zero_();
  }
  auto same = [](const Pass* a, const Pass* b) {
    return a->feats.scalar_type() == b->feats.scalar_type() && a->plan.strategy == b->plan.strategy &&
           a->plan.vec == b->plan.vec && a->plan.shared == b->plan.shared;
  };
  std::vector<std::vector<Pass*>> groups;
  if (live.size() == 2 && same(live[0], live[1])) groups.push_back(live);
  else for (Pass* p : live) groups.push_back({p});
  for (const auto& g : groups) {
    SumsJobs jobs{};
    jobs.K = static_cast<int>(K);
    jobs.job[0] = g[0]->job;
    jobs.job[1] = g.size() > 1 ? g[1]->job : SumsJob{};
    const int blocks = jobs.job[0].blocks + jobs.job[1].blocks;
    const Plan& plan = g[0]->plan;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g[0]->feats.scalar_type(), "class_sums_cuda", [&] {
      if (plan.vec) launch_sums<scalar_t, vec16<scalar_t>()>(plan, jobs, blocks, device, stream);
      else launch_sums<scalar_t, 1>(plan, jobs, blocks, device, stream);
    });
  }
  // passes split into segments: their partials added in segment order, in one launch when
  // both are split and share the accumulation dtype
  std::vector<Pass*> split;
  for (Pass* p : live)
    if (p->job.segs > 1) split.push_back(p);
  const bool together = split.size() == 2 && split[0]->sums.scalar_type() == split[1]->sums.scalar_type();
  const size_t per_launch = together ? 2 : 1;
  for (size_t first = 0; first < split.size(); first += per_launch) {
    Combine cb{};
    cb.K = static_cast<int>(K);
    for (size_t i = 0; i < per_launch; ++i) {
      const Pass* p = split[first + i];
      cb.partial[i] = p->partial.const_data_ptr();
      cb.partial_counts[i] = p->partial_counts.const_data_ptr<int64_t>();
      cb.sums[i] = p->sums.data_ptr();
      cb.counts[i] = p->counts.data_ptr<int64_t>();
      cb.rows[i] = p->sums.size(0) * K;
      cb.segs[i] = p->job.segs;
      cb.C[i] = p->job.C;
    }
    const int64_t total = cb.rows[0] * (cb.C[0] + 1) + cb.rows[1] * (cb.C[1] + 1);
    AT_DISPATCH_FLOATING_TYPES(split[first]->sums.scalar_type(), "class_sums_combine_cuda", [&] {
      combine_segments_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(cb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

std::tuple<at::Tensor, at::Tensor> class_sums_kernel(const at::Tensor& feats, const at::Tensor& slots,
                                                     int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(feats.device());
  Pass a = make_pass(feats, slots, num_classes);
  run_passes({&a}, num_classes);
  return {a.sums, a.counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_sums_pair_kernel(const at::Tensor& feats_a,
                                                                                  const at::Tensor& slots_a,
                                                                                  const at::Tensor& feats_b,
                                                                                  const at::Tensor& slots_b,
                                                                                  int64_t num_classes) {
  check_same_device(feats_b, "feats_b", feats_a, "feats_a");
  const c10::cuda::CUDAGuard guard(feats_a.device());
  Pass a = make_pass(feats_a, slots_a, num_classes);
  Pass b = make_pass(feats_b, slots_b, num_classes);
  run_passes({&a, &b}, num_classes);
  return {a.sums, a.counts, b.sums, b.counts};
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("class_sums", &class_sums_kernel);
  m.impl("class_sums_pair", &class_sums_pair_kernel);
}

}  // namespace idd_ops
