"""The IFVD cosine ops' CUDA kernels (labels and slots) on the emulator of tests/cuda_emu. Each
case names the branch it reaches; every op is compared with the CPU op of the same name.
"""
import pytest
import torch

import idd_ops  # noqa: F401
from labels import CASES
from test_cuda_emulated import CPU, close, emu, randn, slot_counts  # noqa: F401  (emu: the module fixture)
from test_cuda_emulated_tail import LABEL_TYPE_CASES, kernels  # noqa: F401  (a fixture)


def _cosine_inputs(case, dtype):
    x, y = case.feats(dtype=dtype), case.labels()
    cent, _ = CPU.class_centroids(x, y, case.K, case.ignore_index)
    return x, y, cent


@pytest.mark.parametrize("case", [c for c in CASES if c.id in (
    "clamped-cosine", "ignored-warps", "mixed-warps-resized", "blocks-resize-up", "odd-sizes-ignore-minus-one",
    "uniform-runs-uint8", "absent-classes", "all-ignored")], ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pixel_centroid_cosine_labels(emu, case, dtype):
    x, y, cent = _cosine_inputs(case, dtype)
    ig = case.ignore_index
    want = CPU.pixel_centroid_cosine(x, cent, y, ig, 1e-8)
    grad = randn(*want[0].shape, seed=2, dtype=want[0].dtype)
    want_b = CPU._pixel_centroid_cosine_backward(grad, x, cent, y, *want, ig, 1e-8)
    emu._emu_configure(False, 3)
    close(emu.pixel_centroid_cosine(x, cent, y, ig, 1e-8), want)
    close(emu._pixel_centroid_cosine_backward(grad, x, cent, y, *want, ig, 1e-8), want_b, atol=1e-4)


@pytest.mark.parametrize("case", LABEL_TYPE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pixel_centroid_cosine_labels_low_precision(emu, case, dtype):
    """The labels ops over half and bfloat16 features with uint8, int32 and int64 labels (float32
    centroids, maps and arithmetic; the feature gradient in the features' dtype)."""
    x, y, cent = _cosine_inputs(case, dtype)
    ig = case.ignore_index
    want = CPU.pixel_centroid_cosine(x, cent, y, ig, 1e-8)
    grad = randn(*want[0].shape, seed=2, dtype=want[0].dtype)
    want_b = CPU._pixel_centroid_cosine_backward(grad, x, cent, y, *want, ig, 1e-8)
    emu._emu_configure(False, 3)
    close(emu.pixel_centroid_cosine(x, cent, y, ig, 1e-8), want, rtol=1e-4, atol=1e-4)
    close(emu._pixel_centroid_cosine_backward(grad, x, cent, y, *want, ig, 1e-8), want_b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in (
    "clamped-cosine", "ignored-warps", "mixed-warps", "odd-sizes", "uniform-runs", "all-ignored")],
    ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pixel_centroid_cosine_slots(kernels, case, dtype):
    x, y, cent = _cosine_inputs(case, dtype)
    slots = CPU._label_slots(y, case.H, case.W, case.K, case.ignore_index)
    want = CPU._pixel_centroid_cosine_slots(x, cent, slots, 1e-8)
    close(kernels._pixel_centroid_cosine_slots(x, cent, slots, 1e-8), want)
    grad = randn(*want[0].shape, seed=2, dtype=want[0].dtype)
    args = (grad, x, cent, slots, *want, 1e-8)
    for own in ((), (slot_counts(slots, case.K),)):  # independent centroids, then feats' own
        close(kernels._pixel_centroid_cosine_slots_backward(*args, *own),
              CPU._pixel_centroid_cosine_slots_backward(*args, *own), atol=1e-4)


def _many_class_inputs(K, dtype, C=3, H=5, W=13):
    """Pixels of a few classes spread over [0, K), one of them with zero features, some ignored."""
    g = torch.Generator().manual_seed(K)
    y = torch.randint(0, K, (2, H, W), generator=g)
    y[:, 0, :3] = K - 1
    y[:, 1, 1] = 255
    x = randn(2, C, H, W, dtype=dtype)
    x[0, :, 0, :3] = 0
    cent, _ = CPU.class_centroids(x, y, K, 255)
    return x, y, cent


@pytest.mark.parametrize("K, dtype", [(6145, torch.float64), (12289, torch.float32)])
def test_pixel_centroid_cosine_many_classes(kernels, K, dtype):
    """K class sums past the default 48 KiB a block: the slots backward runs one warp a block,
    adding into global memory; the labels backward opts in to more shared memory."""
    x, y, cent = _many_class_inputs(K, dtype)
    slots = CPU._label_slots(y, 5, 13, K, 255)
    want = CPU._pixel_centroid_cosine_slots(x, cent, slots, 1e-8)
    grad = randn(*want[0].shape, seed=2, dtype=dtype)
    args = (grad, x, cent, slots, *want, 1e-8)
    for own in ((), (slot_counts(slots, K),)):
        close(kernels._pixel_centroid_cosine_slots_backward(*args, *own),
              CPU._pixel_centroid_cosine_slots_backward(*args, *own), atol=1e-4)
    args = (grad, x, cent, y, *want, 255, 1e-8)
    close(kernels._pixel_centroid_cosine_backward(*args), CPU._pixel_centroid_cosine_backward(*args), atol=1e-4)


def _spread_slots_inputs(K, dtype, B=2, C=3, H=53, W=97, seed=0):
    """A slot map of 6 classes spread over [0, K) in random pixels (mixed warps, a tail warp:
    H * W = 5141, which the backward's factor pass splits into 5 segments of 1280 pixels where
    K <= 204, the last one short), 10 % ignored, with features, centroids and an upstream
    gradient."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randint(0, 6, (B, H, W), generator=g) * ((K - 1) // 5)).clamp_max(K - 1)
    y[torch.rand(B, H, W, generator=g) < 0.1] = 255
    x = (randn(B, C, H, W, seed=seed + 1, dtype=torch.float64) + 0.5).to(dtype)
    cent, _ = CPU.class_centroids(x, y, K, 255)
    slots = CPU._label_slots(y, H, W, K, 255)
    cos, norms = CPU._pixel_centroid_cosine_slots(x, cent, slots, 1e-8)
    grad = randn(*cos.shape, seed=seed + 2, dtype=cos.dtype)
    return grad, x, cent, slots, cos, norms, 1e-8


def _class_sum_layout(K, acc_bytes, budget=48 * 1024, threads=256):
    """(threads, dynamic shared bytes) of the slots backward's blocks: per-thread class sums
    where K sums per thread and K totals fit the budget, else per-warp sums in as many warps as
    fit (up to 8), else one warp adding into global memory."""
    if (K * threads + K) * acc_bytes <= budget:
        return threads, (K * threads + K) * acc_bytes
    warps = min(threads // 32, budget // (K * acc_bytes))
    return 32 * max(warps, 1), warps * K * acc_bytes


# K and the accumulation dtype set where a block keeps its class sums (48 KiB): per thread up to
# K = 47 (float32) / 23 (float64); per warp beyond, 8 warps (48 float32, 24 float64), 7 (1537
# float32), 6 (1000 float64); one warp adding into global memory (12289 float32).
@pytest.mark.parametrize("K, dtype", [(6, torch.float32), (6, torch.float16), (6, torch.bfloat16),
                                      (6, torch.float64), (47, torch.float32), (48, torch.float32),
                                      (23, torch.float64), (24, torch.float64), (1537, torch.float32),
                                      (1000, torch.float64), (12289, torch.float32)])
def test_pixel_centroid_cosine_slots_backward_is_deterministic(emu, K, dtype):
    """The slots backward adds its class sums in a fixed order, without atomics: the same bits
    for every order of blocks and threads (three emulator seeds), and the CPU op's values; the
    launch log shows the class-sum layout each K takes. With the centroids' own counts (the
    second pass over each row) as well."""
    plain = _spread_slots_inputs(K, dtype)
    for args in (plain, plain + (slot_counts(plain[3], K),)):
        want = CPU._pixel_centroid_cosine_slots_backward(*args)
        runs = []
        for seed in (1, 2, 3):
            emu._emu_configure(False, seed)
            emu._emu_launch_log()
            runs.append(emu._pixel_centroid_cosine_slots_backward(*args))
            log = emu._emu_launch_log()
            shapes = [tuple(log[i + 1:i + 3]) for i in range(0, len(log), 3)]
            acc_bytes = 8 if dtype == torch.float64 else 4
            assert shapes.count(_class_sum_layout(K, acc_bytes)) == 2, shapes  # the factors and rows kernels
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2  # half grad_feats: one rounding
        close(runs[0], want, rtol=tol, atol=tol)
        for run in runs[1:]:
            for got, first in zip(run, runs[0]):
                assert torch.equal(got, first)


# The next set's rows kernel (IDD_OPS_CUDA_NEXT) takes two rows of an image a block where a
# row's per-thread sums fit twice in 48 KiB (K up to 23 in float32, 11 in float64) and C is even;
# elsewhere the one-row kernel.
@pytest.mark.parametrize("K, dtype, C, pairs", [
    (6, torch.float32, 4, True), (23, torch.float32, 2, True), (24, torch.float32, 4, False),
    (6, torch.float32, 3, False), (11, torch.float64, 6, True), (12, torch.float64, 2, False),
    (6, torch.float16, 4, True), (6, torch.bfloat16, 8, True), (1537, torch.float32, 2, False)])
def test_rows_two_a_block_give_the_one_row_bits(emu, K, dtype, C, pairs):
    """Both outputs, with and without the centroids' own counts, under two orders of blocks: the
    bits of the one-row kernel, which takes the same rows with one channel more (C + 1 odd; a
    zero centroid channel, so the same centroid norms and factor pass), and the launch log's rows
    kernel: half the blocks, each with two rows' shared sums, where pairs are taken."""
    plain = _spread_slots_inputs(K, dtype, C=C)
    grad, x, cent, slots, cos, norms, eps = plain
    wider = (grad, torch.cat([x, randn(2, 1, *x.shape[2:], seed=9, dtype=x.dtype)], 1),
             torch.cat([cent, cent.new_zeros(*cent.shape[:2], 1)], 2), slots, cos, norms, eps)
    counts = (slot_counts(slots, K),)
    for args, one_row in ((plain, wider), (plain + counts, wider + counts)):
        emu._emu_configure(True, 1)
        want = emu._pixel_centroid_cosine_slots_backward(*one_row)
        for seed in (1, 2):
            emu._emu_configure(True, seed)
            emu._emu_launch_log()
            got = emu._pixel_centroid_cosine_slots_backward(*args)
            blocks, threads, shared = emu._emu_launch_log()[-3:]  # the rows kernel, launched last
            layout = _class_sum_layout(K, 8 if dtype == torch.float64 else 4)
            assert (blocks, threads, shared) == ((C, layout[0], 2 * layout[1]) if pairs else (2 * C, *layout))
            assert torch.equal(got[0], want[0][:, :C]) and torch.equal(got[1], want[1][..., :C])


def test_pixel_centroid_cosine_labels_backward_class_limit(kernels):
    """Past the 227 KiB opt-in of the emulated GPU (29056 float64 class sums) the labels backward
    raises a ValueError naming num_classes, before any launch."""
    K = 29057
    x, y, cent = _many_class_inputs(K, torch.float64, C=1, H=2, W=3)
    cos, norms = CPU.pixel_centroid_cosine(x, cent, y, 255, 1e-8)
    with pytest.raises(ValueError, match="num_classes"):
        kernels._pixel_centroid_cosine_backward(torch.ones_like(cos), x, cent, y, cos, norms, 255, 1e-8)


# Where each class-sum layout of the slots backward writes its centroid gradients, and the
# factor pass's segments per image: per thread (6: 5 segments; 1 x 8193 pixels: 8 segments of
# 1280, the last one past the pixels), per warp (48: 5 segments; 1537: 1), one warp adding into
# global memory (12289: 1).
@pytest.mark.parametrize("K, H, W", [(6, 53, 97), (6, 1, 8193), (48, 53, 97), (1537, 53, 97), (12289, 53, 97)])
def test_pixel_centroid_cosine_slots_write_every_output(emu, poisoned_empties, K, H, W):
    """The slots forward's maps, the backward's per-segment class sums and its centroid
    gradients start uninitialised (no fill launches): every element must be written, absent
    classes' gradients and empty segments' sums included."""
    emu._emu_configure(False, 5)
    grad, x, cent, slots, cos, norms, eps = _spread_slots_inputs(K, torch.float32, H=H, W=W)
    for got, want in zip(emu._pixel_centroid_cosine_slots(x, cent, slots, eps),
                         CPU._pixel_centroid_cosine_slots(x, cent, slots, eps)):
        close(got, want)
    args = (grad, x, cent, slots, cos, norms, eps)
    for own in ((), (slot_counts(slots, K),)):  # with counts every pixel is written by the second pass
        close(emu._pixel_centroid_cosine_slots_backward(*args, *own),
              CPU._pixel_centroid_cosine_slots_backward(*args, *own), atol=1e-4)


def test_pixel_centroid_cosine_slots_without_pixels(emu, poisoned_empties):
    """No pixels (W = 0): empty maps, and zero centroid gradients."""
    emu._emu_configure(False, 5)
    x, cent = randn(2, 3, 4, 0), randn(2, 5, 3, seed=1)
    slots = torch.zeros(2, 4, 0, dtype=torch.int16)
    cos, norms = emu._pixel_centroid_cosine_slots(x, cent, slots, 1e-8)
    assert cos.shape == norms.shape == (2, 4, 0)
    grad_f, grad_c = emu._pixel_centroid_cosine_slots_backward(torch.ones_like(cos), x, cent, slots, cos, norms, 1e-8)
    assert grad_f.shape == x.shape and torch.equal(grad_c, torch.zeros_like(cent))
