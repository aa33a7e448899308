// Per-image class sums of a feature map (class_sums, class_sums_pair) on CUDA: every feature
// element is read once, with 16-byte loads where the layout allows, and reduced in a fixed order
// without float atomics, so the sums have the same bits on every run. The sums are float64 for
// every feature dtype; blocks accumulate x - pivot in float32 (float64 for float64 features) and
// add count * pivot back in float64 (class_sums_blocks.cuh says why that bounds the rounding).
//
// A block owns (image, channel tile, pixel segment) and writes its own sums: the image's
// [K, C-tile] block of the output, or of a per-segment float64 partial when the pixels are split
// into segments (for enough blocks, or to bound the sequential part of each sum); one more small
// launch then adds the segments in order (the next set: the last segment block of each image and
// tile adds them, class_sums_fold.cuh). Three strategies, by layout and K: P and W for NCHW
// (class_sums_nchw.cuh), L for channels_last (class_sums_last.cuh). Every shared-memory request
// stays within the GPU's opt-in limit: L falls back to one NCHW copy and W, W to fewer warps,
// and past one warp's sums (about K = 18000 on a 227 KiB GPU) the call stops with an error.
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "class_sums_last.cuh"
#include "class_sums_nchw.cuh"

namespace idd_ops {
namespace class_sums_cuda {
namespace {

constexpr size_t kPrivateBudget = 48 * 1024;  // P: what every GPU grants without opting in
constexpr size_t kLastBudget = 96 * 1024;     // L: at most this, where the GPU offers it
// More than a loop index passes its segment's end by: P's steps loaded together (2 x 256 x 8),
// W's warp shares (4 x 256 + 4) and chunks loaded together, L's unroll.
constexpr int64_t kPixelSlack = 2 * int64_t{kStepsAhead} * kPrivateThreads * 8;

enum class Strategy { Private, Warp, Last };

struct Plan {
  Strategy strategy;
  bool vec;                  // 16-byte accesses
  int threads, tiles, unit;  // unit: pixels one accumulator takes per step
  size_t shared;
};

struct Pass {
  at::Tensor feats, slots, sums, counts, partial, partial_counts;
  Plan plan;
  SumsJob job;
};

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

int64_t acc_bytes(const at::Tensor& feats) { return feats.scalar_type() == at::kDouble ? 8 : 4; }

// L for channels_last feats where its sums fit in min(kLastBudget, optin) bytes: 16-byte lanes
// when they fit, else one channel per lane; nothing where neither fits (the caller then copies).
std::optional<Plan> plan_last(const at::Tensor& feats, int64_t K, size_t optin) {
  const int64_t acc = acc_bytes(feats), C = feats.size(1);
  const int vec = 16 / static_cast<int>(feats.element_size());
  const size_t budget = std::min(kLastBudget, optin);
  const bool aligned = C % vec == 0 && aligned16(feats.const_data_ptr());
  for (const bool v : {true, false}) {
    if (v && !aligned) continue;
    const int lanes_c = 32 * (v ? vec : 1);
    const auto shared = static_cast<size_t>(K * (kWarps * lanes_c * acc + 4));
    if (shared <= budget)
      return Plan{Strategy::Last, v, kWarps * 32, static_cast<int>((C + lanes_c - 1) / lanes_c), kWarps, shared};
  }
  return std::nullopt;
}

// P where its sums fit the default 48 KiB, else W with as many warps (4, 2, 1) as the GPU's
// opt-in shared memory holds; an error past one warp's sums.
Plan plan_nchw(const at::Tensor& feats, int64_t K, size_t optin) {
  const int64_t acc = acc_bytes(feats), C = feats.size(1), HW = feats.size(2) * feats.size(3);
  const int vec = 16 / static_cast<int>(feats.element_size());
  // NCHW rows start 16-byte aligned when HW is a multiple of VEC and the base pointer is.
  const bool v = HW % vec == 0 && aligned16(feats.const_data_ptr());
  const int tiles = static_cast<int>((C + kTile - 1) / kTile);
  const auto private_bytes = static_cast<size_t>(K * (kTile * kPrivateThreads * acc + 4));
  if (private_bytes <= std::min(kPrivateBudget, optin))
    return {Strategy::Private, v, kPrivateThreads, tiles, kPrivateThreads, private_bytes};
  size_t shared = 0;
  for (int warps = kWarps; warps >= 1; warps /= 2) {
    shared = static_cast<size_t>(K * (warps * kTile * acc + 4));
    if (shared <= optin) return {Strategy::Warp, v, warps * 32, tiles, warps * 32 * (v ? vec : 1), shared};
  }
  TORCH_CHECK_VALUE(false, "num_classes: ", K, " classes need ", shared, " bytes of shared memory per block on CUDA ",
                    "(one warp's ", feats.scalar_type() == at::kDouble ? "float64" : "float32",
                    " sums), more than this GPU's ", optin);
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

// A pass over inputs checked by check_class_sums_inputs (the entry points check before taking
// the CUDA guard, which a CPU tensor among the arguments would fail with a RuntimeError).
Pass make_pass(const at::Tensor& feats_in, const at::Tensor& slots_in, int64_t K) {
  const int64_t B = feats_in.size(0), C = feats_in.size(1), HW = feats_in.size(2) * feats_in.size(3);
  // the pixel loops' int indices step up to kPixelSlack past HW
  TORCH_CHECK_VALUE(C * HW < (int64_t{1} << 31) && B * C < (int64_t{1} << 31) &&
                        B * HW < (int64_t{1} << 31) - kPixelSlack,
                    "feats: at most 2^31 - 1 elements per image and images times channels, and under 2^31 - ",
                    kPixelSlack, " images times pixels on CUDA, got ", feats_in.sizes());
  Pass ps;
  ps.slots = slots_in.contiguous();
  if (!aligned16(ps.slots.const_data_ptr())) ps.slots = ps.slots.clone();  // vector loads of slots
  const int device = feats_in.get_device();
  const auto optin = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const std::optional<Plan> last = channels_last_layout(feats_in) ? plan_last(feats_in, K, optin) : std::nullopt;
  ps.feats = last ? feats_in : feats_in.contiguous();  // channels_last past L's K: one NCHW copy
  ps.plan = last ? *last : plan_nchw(ps.feats, K, optin);
  const bool empty = B * HW * C == 0;  // no block runs: the pivots' first pixel may not exist
  const int segs = empty ? 1 : segments(ps.plan, B, HW, K, device);
  const int vec = ps.plan.vec ? 16 / static_cast<int>(ps.feats.element_size()) : 1;
  const int64_t seg_len = ((HW + segs - 1) / segs + vec - 1) / vec * vec;
  ps.sums = at::empty({B, K, C}, ps.feats.options().dtype(at::kDouble));
  ps.counts = at::empty({B, K}, ps.feats.options().dtype(at::kLong));
  const int real_segs = empty ? 1 : static_cast<int>((HW + seg_len - 1) / seg_len);
  if (real_segs > 1) {
    ps.partial = at::empty({B, real_segs, K, C}, ps.sums.options());
    ps.partial_counts = at::empty({B, real_segs, K}, ps.counts.options());
  }
  const int64_t blocks = empty ? 0 : B * ps.plan.tiles * real_segs;
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 30), "feats: too many blocks for one launch (", blocks, ")");
  ps.job = {ps.feats.const_data_ptr(), ps.slots.const_data_ptr<int16_t>(),
            real_segs > 1 ? ps.partial.data_ptr<double>() : ps.sums.data_ptr<double>(),
            real_segs > 1 ? ps.partial_counts.data_ptr<int64_t>() : ps.counts.data_ptr<int64_t>(),
            static_cast<int>(C), static_cast<int>(HW), ps.plan.tiles, real_segs, static_cast<int>(seg_len),
            static_cast<int>(blocks)};
  return ps;
}

// Counts of slots [B, HW] for a map without channels (no block runs then). The slots are checked
// here as the kernels check them (a device-side assert, no sync): without it a slot of K would
// land in the ignored column and one below -1 would count as ignored, silently.
at::Tensor counts_of_slots(const at::Tensor& slots, int64_t K) {
  at::Tensor idx = slots.flatten(1).to(at::kLong);  // reshape cannot infer -1 for B = 0
  at::_assert_async(((idx >= -1) & (idx < K)).all(), "slots: a value is outside [-1, num_classes)");
  idx = at::where(idx >= 0, idx, at::full_like(idx, K));
  return at::zeros({slots.size(0), K + 1}, idx.options()).scatter_add_(1, idx, at::ones_like(idx)).narrow(1, 0, K)
      .contiguous();
}

// `fold`: the next set's kernels, which finish split jobs themselves (class_sums_fold.cuh).
template <typename scalar_t, int VEC>
void launch_sums(const Plan& plan, const SumsJobs& jobs, int blocks, int device, cudaStream_t stream,
                 const Fold* fold) {
  if (fold != nullptr) {
    auto kernel = plan.strategy == Strategy::Private ? sums_private_folded_kernel<scalar_t, VEC>
                  : plan.strategy == Strategy::Warp  ? sums_warp_folded_kernel<scalar_t, VEC>
                                                     : sums_last_folded_kernel<scalar_t, VEC>;
    allow_shared_memory(kernel, plan.shared, device, jobs.K);
    kernel<<<blocks, plan.threads, plan.shared, stream>>>(jobs, *fold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto kernel = plan.strategy == Strategy::Private ? sums_private_kernel<scalar_t, VEC>
                : plan.strategy == Strategy::Warp  ? sums_warp_kernel<scalar_t, VEC>
                                                   : sums_last_kernel<scalar_t, VEC>;
  allow_shared_memory(kernel, plan.shared, device, jobs.K);  // within the opt-in limit: planned so
  kernel<<<blocks, plan.threads, plan.shared, stream>>>(jobs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The next set's finish of a launch's jobs: each job's outputs, and counters (one per image and
// tile of every job) where a job is split. `counters` holds them until the launch is queued.
Fold fold_of(const std::vector<Pass*>& group, at::Tensor& counters) {
  Fold fold{};
  int64_t groups = 0;
  bool split = false;
  for (size_t i = 0; i < group.size(); ++i) {
    fold.sums[i] = group[i]->sums.data_ptr<double>();
    fold.counts[i] = group[i]->counts.data_ptr<int64_t>();
    groups += group[i]->job.blocks / group[i]->job.segs;
    split = split || group[i]->job.segs > 1;
  }
  if (split) {
    counters = grid_ticket_counters(group[0]->feats.device(), groups);
    fold.counters = reinterpret_cast<unsigned*>(counters.data_ptr<int>());
  }
  return fold;
}

// Adds the segments' partials of the split passes in segment order, both in one launch.
void combine_passes(const std::vector<Pass*>& split, int64_t K, cudaStream_t stream) {
  if (split.empty()) return;
  Combine cb{};
  cb.K = static_cast<int>(K);
  for (size_t i = 0; i < split.size(); ++i) {
    const Pass* p = split[i];
    cb.partial[i] = p->partial.const_data_ptr<double>();
    cb.partial_counts[i] = p->partial_counts.const_data_ptr<int64_t>();
    cb.sums[i] = p->sums.data_ptr<double>();
    cb.counts[i] = p->counts.data_ptr<int64_t>();
    cb.rows[i] = p->sums.size(0) * K;
    cb.segs[i] = p->job.segs;
    cb.C[i] = p->job.C;
  }
  const int64_t total = cb.rows[0] * (cb.C[0] + 1) + cb.rows[1] * (cb.C[1] + 1);
  combine_segments_kernel<<<blocks_for(total), kThreads, 0, stream>>>(cb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the passes' blocks: one grid for both when they share dtype and plan.
void run_passes(const std::vector<Pass*>& passes, int64_t K) {
  const int device = passes[0]->feats.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<Pass*> live;
  for (Pass* p : passes) {
    if (p->job.blocks > 0) {
      live.push_back(p);
      continue;
    }
    if (p->job.HW > 0 && p->job.C == 0) p->counts.copy_(counts_of_slots(p->slots, K));
    else p->counts.zero_();  // B == 0 or HW == 0
    p->sums.zero_();
  }
  auto same = [](const Pass* a, const Pass* b) {
    return a->feats.scalar_type() == b->feats.scalar_type() && a->plan.strategy == b->plan.strategy &&
           a->plan.vec == b->plan.vec && a->plan.threads == b->plan.threads && a->plan.shared == b->plan.shared;
  };
  std::vector<std::vector<Pass*>> groups;
  if (live.size() == 2 && same(live[0], live[1])) groups.push_back(live);
  else for (Pass* p : live) groups.push_back({p});
  const bool folded = cuda_next_enabled(NextGroup::class_sums);
  for (const auto& g : groups) {
    SumsJobs jobs{};
    jobs.K = static_cast<int>(K);
    jobs.job[0] = g[0]->job;
    jobs.job[1] = g.size() > 1 ? g[1]->job : SumsJob{};
    const int blocks = jobs.job[0].blocks + jobs.job[1].blocks;
    const Plan& plan = g[0]->plan;
    at::Tensor counters;
    const Fold fold = folded ? fold_of(g, counters) : Fold{};
    const Fold* f = folded ? &fold : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g[0]->feats.scalar_type(), "class_sums_cuda", [&] {
      if (plan.vec) launch_sums<scalar_t, vec16<scalar_t>()>(plan, jobs, blocks, device, stream, f);
      else launch_sums<scalar_t, 1>(plan, jobs, blocks, device, stream, f);
    });
  }
  if (folded) return;
  std::vector<Pass*> split;  // passes split into segments (all float64 partials: one launch)
  for (Pass* p : live)
    if (p->job.segs > 1) split.push_back(p);
  combine_passes(split, K, stream);
}

std::tuple<at::Tensor, at::Tensor> class_sums_kernel(const at::Tensor& feats, const at::Tensor& slots,
                                                     int64_t num_classes) {
  check_class_sums_inputs(feats, slots, num_classes);
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
  check_class_sums_inputs(feats_a, slots_a, num_classes);
  check_class_sums_inputs(feats_b, slots_b, num_classes);
  const c10::cuda::CUDAGuard guard(feats_a.device());
  Pass a = make_pass(feats_a, slots_a, num_classes);
  Pass b = make_pass(feats_b, slots_b, num_classes);
  run_passes({&a, &b}, num_classes);
  return {a.sums, a.counts, b.sums, b.counts};
}

}  // namespace
}  // namespace class_sums_cuda

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("class_sums", &class_sums_cuda::class_sums_kernel);
  m.impl("class_sums_pair", &class_sums_cuda::class_sums_pair_kernel);
}

}  // namespace idd_ops
