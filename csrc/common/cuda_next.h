#pragma once
// CUDA kernels and GPU formulations written since the last GPU run are compiled in but switched off
// until a GPU has validated them: IDD_OPS_CUDA_NEXT=1 selects them, or a list of their groups
// (next_groups.h) some of them (read once per process; idd_ops/_switches.py is the Python side of
// the same switch). tools/gpu_check.sh with
// KERNELS="default next" runs its stages under both settings; the first GPU session that passes
// them switches them on and deletes what they replace. Behind it at present: SKD's pivot,
// pooling, centring and gradient kernels with loads ahead (affinity_pivot.cuh and
// affinity_gradient.cuh: kPivotAhead, kPooledAhead, kCentredAhead, kGradientAhead; the same
// bits), the IDD tail's forward in one launch, its Grams split over channel ranges where its
// tile blocks are few (idd_tail_forward_cuda.cu's one-pass kernel, idd_tail_gram.cuh, with the
// last-block tickets of grid_tickets.cuh), the class sums' segments added by each tile's last
// segment block instead of a combine launch (class_sums_fold.cuh), the position loss's
// "mean"/"sum" finished by its forward's last block (position_tables_forward_sum), IFVD's two
// maps in one op and its loss in one, the maps' launch adding the squares (ifvd_maps_cuda.cu),
// the class means in one (class_means_cuda.cu) and pixel KD and CWD reduced in one
// (pixel_kd_sum_cuda.cu, its sums finished by the last block); these three are chosen on the
// Python side (_switches.ifvd_maps_path, class_means_path, pixel_kd_sum_path): no kernel of
// theirs reads it. And the slot-map cosine backward's rows two a block
// (cosine_slots_backward_cuda.cu: row_pairs; the same bits). And SKD's operands interleaved in
// one tensor, so that its forward takes 2 GEMMs and its backward 1 where they took 3 and 2, its
// backward's operands formed with u in one launch and each image's mean added by its Gram tail's
// last block (affinity_loss_cuda.cu, affinity_grams.cuh: 6 + 6 launches a chunk, from 8 + 8; not
// the default's bits, as the GEMMs have other shapes), and SKD's "mean" and "sum" added by the
// last chunk's Gram tail (_affinity_loss_sum, chosen by _switches.affinity_sum_path).
// The kernels it held before (class sums, the fused IDD tail, the slot-map cosine, one-read
// softmax-KL, column-table position maps, SKD's batched formulation) are the defaults since an
// H200 passed them on 2026-12-04.
#include <cstdlib>
#include <cstring>

#include "next_groups.h"

namespace idd_ops {

// Whether the environment variable `name` is "1" (read at each call; the private switches the
// tests set, such as _IDD_OPS_SKD_BATCHED and IDD_OPS_FORCE_INDEX64, use it directly).
inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// Whether IDD_OPS_CUDA_NEXT switches `group` on (a value it cannot read raises at each call).
inline bool cuda_next_enabled(NextGroup group) {
  static const uint32_t on = parse_next_groups(std::getenv("IDD_OPS_CUDA_NEXT"));
  return (on & static_cast<uint32_t>(group)) != 0;
}

}  // namespace idd_ops
