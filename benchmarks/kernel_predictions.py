"""Each kernel's device time per call as predicted before a GPU ran it (docs/DEVELOPING.md's
predictions, kept here as data), so that a GPU run's "Kernels per call" (kernel_times.section)
sets every predicted kernel beside its prediction and names the ones that missed: predict,
measure, look back, without copying numbers by hand.

A prediction is for the kernel set that waits to be switched on: "next" while a row has one,
else "default" (after the switch-on the next set is the default). A session that measures them
moves what it learnt into docs/DEVELOPING.md and replaces these with the next predictions.
"""
import re

# How far over its prediction a kernel may run before the section names it as a miss (a
# prediction is a bandwidth estimate from bytes, registers and blocks an SM, not a bound).
MISS = 1.5

# (row case, row mode, kernel label pattern (re.fullmatch on kernel_times.label), predicted us per
# call, basis). Patterns take both the name behind the switch and the one after the switch-on.
PREDICTIONS = [
    # SKD at B=8, C=512, pool 2: 2 chunks of 4 images; forward+backward runs the pooling, pivot and
    # centring kernels twice a chunk, the gradient kernel once
    ("skd pool2", "forward+backward", r"affinity_cuda::pivot_kernel(<16>)?", 80.0,
     "4 launches x 0.02 ms: 256 block sums a thread, 16 loads in flight (0.17 ms a launch with 1)"),
    ("skd pool2", "forward+backward", r"affinity_cuda::pooled_sums_kernel<float(, 2)?>", 240.0,
     "4 x 0.06 ms: 134 MB of reads a chunk with 16 loads a thread in flight (1.1 TB/s with 8)"),
    ("skd pool2", "forward+backward", r"affinity_cuda::centred_kernel<float(, 4)?>", 120.0,
     "4 x 0.03 ms: 67 MB read and written a chunk, 2.7x the loads in flight"),
    ("skd pool2", "forward+backward", r"affinity_cuda::affinity_gradient_kernel<float(, 3)?>", 128.0,
     "2 x 0.064 ms: 167 MB of DRAM traffic a chunk (184 MB less the second GEMM result, 17 MB, now "
     "added in the one GEMM), 21 loads a thread in flight (7 at 1.1 TB/s)"),
    # its GEMM operands interleaved: the Gram tail adds each image's mean in its last block, the
    # backward's operand is formed with u
    ("skd pool2", "forward+backward", r"affinity_cuda::gram_tail_means_kernel<float>", 20.0,
     "2 x 0.01 ms: 1024 tile blocks a chunk reading 16 MB of Grams and writing 4 MB of the kept G_xd, "
     "then each image's last block adding 256 tile sums and 2048 beta squares"),
    ("skd pool2", "forward+backward", r"affinity_cuda::operands_u_kernel<float, float>", 16.0,
     "2 x 0.008 ms: a warp a row, 8 MB of kept Grams read and 8 MB of [G_xd | G_xy] written a chunk"),
    # IDD at K=19, B=8: the tail's forward in one launch, its Grams split 16 ways over the channels
    # (forward, and again in forward+backward)
    *[("idd_loss cityscapes", mode, r"idd_tail_one_pass_kernel<double, double, 16, float>", 18.0,
       "24 tiles x 16 channel ranges (1/16 of the 2048 + 512 channels the tile kernel's 0.123 ms walked, "
       "0.01 ms), then each tile's last block adds 16 partials (0.005) and the last tile finishes (0.003)")
      for mode in ("forward", "forward+backward")],
    # class_centroids: the means in one launch each way (ATen's clamp, division and cast: 0.010 ms)
    ("class_centroids cityscapes", "forward", r"divide_by_counts_kernel<double, float>", 3.0,
     "one elementwise pass over B x K x C = 311 k float64 sums"),
    ("class_centroids cityscapes", "forward+backward", r"divide_by_counts_kernel<double, float>", 3.0,
     "the forward's pass"),
    ("class_centroids cityscapes", "forward+backward", r"divide_by_counts_kernel<float, double>", 3.0,
     "the backward's: the same pass from float32 to float64"),
    # pixel KD (B=8, K=19, 512x1024, labels): reduced in one op, softmax_kl's walks
    ("pixel_kd", "forward+backward", r"kl_pixels_sum_forward<float>", 350.0,
     "kl_pixels_forward's 0.351 ms less its 17 MB KL write; then the last block adds 16384 blocks' "
     "two float64 sums (256 KB, 0.005 ms)"),
    ("pixel_kd", "forward+backward", r"kl_pixels_sum_backward<float, 4>", 310.0,
     "kl_pixels_backward's 0.314 ms: the per-pixel gradient formed from two scalars and the slot map"),
    # CWD (B=8, C=512, 64x128, T=4): through the same op over its 4096 rows of 8192, a block a row
    ("cwd", "forward+backward", r"kl_rows_sum_forward<float, 4, 256>", 90.0,
     "kl_rows_forward's 0.088 ms; then the last block adds 4096 blocks' two float64 sums (64 KB)"),
    ("cwd", "forward+backward", r"kl_rows_sum_backward<float, 4, 256>", 92.0,
     "kl_rows_backward's 0.092 ms: the row's gradient formed from two scalars"),
    # the position loss at 512x1024 (B=8, M=5): the forward's last block adds the partials (8 x 132
    # blocks' float32 sums) where a one-block finalise took a launch
    *[("position_loss 512x1024", mode, r"position_tables_forward_sum<float, 4>", 20.0,
       "the partial pass's 83.9 MB read (0.017 ms at 4.8 TB/s), then one block adds 1056 partials (0.002)")
      for mode in ("forward", "forward+backward")],
    # IDD at B=2, C=256: the class sums split into 6 segments an (image, tile), added by each tile's
    # last segment block where combine_segments_kernel took a launch (0.004 ms)
    *[("idd_loss b2-c256", mode, r"sums_private(_folded)?_kernel<float, 4>", 35.0,
       "the pass's 0.031-0.034 ms, then each tile's last block adds 6 segments of 19 x 2 float64 sums")
      for mode in ("forward", "forward+backward")],
    # IFVD: both centroid tables in one launch, both maps and the loss in another, the gradient map
    # formed in the cosine backward's factor pass
    ("ifvd", "forward+backward", r"centroid_tables_from_sums_kernel<float>", 10.0,
     "a warp a (image, class) row of both networks' sums"),
    ("ifvd", "forward+backward", r"cosine_pair_forward_kernel<float>", 172.0,
     "the two slot-map forwards' 0.168 ms in one launch; its tiles' last blocks add B x H x W = 65 k "
     "squared differences read through L2 (0.5 MB: 0.004 ms)"),
    ("ifvd", "forward+backward", r"(ifvd_loss|cosine_slots)_factors_kernel<float>", 12.0,
     "the slot backward's factor pass (not in the H200's six longest, so about 0.01 ms or less), "
     "reading the teacher's map too (65 k floats: 0.26 MB)"),
    # its rows two a block (C = 512 even, K = 19: two rows' per-thread sums in 39 KiB)
    ("ifvd", "forward+backward", r"cosine_slots_backward_row_pairs_kernel<float>", 155.0,
     "the one-row kernel's 0.216 ms was L2 traffic, 28 bytes a pixel and row (0.94 GB at 4.4 TB/s); "
     "two rows a block share the slot, a and bf loads: 20 bytes (0.67 GB)"),
]


def predicted_set(rows):
    """The kernel set the predictions are for in a run of `rows`: "next" where the run measured
    one (for every row: a row the next set's process did not reach has no kernels to compare)."""
    return "next" if any(key.startswith("fused_next_") for r in rows for key in r) else "default"


def prediction(row, kernel_set, label, rows):
    """(us per call, basis) predicted for kernel `label` of `row` (one of the run's `rows`) under
    `kernel_set`, or None."""
    if kernel_set != predicted_set(rows):
        return None
    for case, mode, pattern, us, basis in PREDICTIONS:
        if case == row["case"] and mode == row["mode"] and re.fullmatch(pattern, label):
            return us, basis
    return None


def misses(rows):
    """["case, mode: kernel took X us a call, N.Nx its prediction of Y us (basis)"] for every
    predicted kernel of `rows` that ran more than MISS times its prediction, and for every
    prediction of a profiled row whose kernel did not run at all (a name changed, or a path not
    taken)."""
    out = []
    kernel_set = predicted_set(rows)
    key = "fused_next" if kernel_set == "next" else "fused"
    for row in rows:
        kernels = row.get(key + "_kernels")
        if not kernels:
            continue
        for case, mode, pattern, us, basis in PREDICTIONS:
            if case != row["case"] or mode != row["mode"]:
                continue
            ran = [(name, per_call) for name, _, per_call in kernels if re.fullmatch(pattern, name)]
            if not ran:
                out.append(f"{case}, {mode}: no kernel matching `{pattern}` ran ({kernel_set} kernels), "
                           f"predicted {us:g} us a call ({basis})")
            for name, per_call in ran:
                if per_call > MISS * us:
                    out.append(f"{case}, {mode}: `{name}` took {per_call:.1f} us a call, {per_call / us:.1f}x its "
                               f"prediction of {us:g} us ({basis})")
    return out
