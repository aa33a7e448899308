"""The branches of CUDA kernels on the emulator of tests/cuda_emu: the fused IDD tail and the
class_centroids kernels (the IFVD cosine ops are in test_cuda_emulated_cosine.py). Each case names
the branch it reaches; every op is compared with the CPU op of the same name, and with
idd_ops.reference in float64 where the precision is the point (a common offset in the sums).
"""
import pytest
import torch

import idd_ops  # noqa: F401
from labels import CASES, IDS
from test_cuda_emulated import CPU, close, emu, randn  # noqa: F401  (emu: the module fixture)
from test_idd_tail import _random_case, _reference_from_sums


@pytest.fixture
def kernels(emu):
    emu._emu_configure(False, 11)
    return emu


@pytest.fixture(params=[False, True], ids=["default", "next"])
def tail_kernels(emu, request):
    """Both kernel sets: the tail's forward is the tile and finish kernels in the default set and
    one kernel in the next set (IDD_OPS_CUDA_NEXT)."""
    emu._emu_configure(request.param, 11)
    yield emu
    emu._emu_configure(False, 11)


# ---- fused IDD tail ---------------------------------------------------------------------------

def _tail_case(B, K, Cs, Ct, dtype=torch.float32, absent=0.25, seed=0):
    """Random sums and counts (student and teacher absent classes drawn apart, so some classes
    are present in one network only)."""
    return _random_case(B, K, Cs, Ct, dtype=dtype, absent=absent, seed=seed)


def check_tail(ops, ss, sc, ts, tc, metric, normalize, reduction, dtype=None, eps=1e-8, rtol=1e-5, atol=1e-5,
               fused=True, grad=None, loss_dtype=None):
    """The emulated fused tail against the CPU composite: loss, dist, stats row K (Q only under
    normalize) and the backward from each side's own saved tensors. `fused`: whether the fused
    kernels take the inputs (else the composite runs: no launch). Returns the emulated outputs."""
    args = (ss, sc, ts, tc, metric, normalize, eps, reduction, dtype, loss_dtype)
    before = ops._emu_launches()
    got, want = ops.idd_tail(*args), CPU.idd_tail(*args)
    assert (ops._emu_launches() > before) == fused
    close(got[:2], want[:2], rtol, atol)
    K = ss.shape[1]
    cols = slice(None) if normalize else [0, 1, 2, 3, 4, 5, 7]
    close(got[2][:, K, cols], want[2][:, K, cols], rtol, atol)
    if grad is None:
        grad = torch.rand(want[0].shape, generator=torch.Generator().manual_seed(K), dtype=want[0].dtype) + 0.5
    tail = (metric, normalize, eps, reduction)
    close(ops._idd_tail_backward(grad, ss, sc, tc, got[1], got[2], *tail),
          CPU._idd_tail_backward(grad, ss, sc, tc, want[1], want[2], *tail), rtol, atol)
    return got


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("B, K, Cs, Ct", [
    (2, 19, 40, 300),   # T 16, chunks of 128: 6 tile blocks, 3 ranges; the student's all in range 0
    (2, 70, 150, 20),   # T 32, chunks of 64: 12 tile blocks, 3 ranges, the last one cut short
    (1, 300, 100, 70),  # T 64: 15 tile blocks, not split (T 64 never is)
], ids=["T16", "T32", "T64"])
def test_tail_forward_in_one_launch(kernels, metric, normalize, B, K, Cs, Ct):
    """IDD_OPS_CUDA_NEXT runs the tail's forward as one kernel (the pairs and finish kernels
    follow under normalize): where the tile blocks are few and T <= 32 the Grams are split over
    channel ranges and each tile's last block adds the partials, and the grid's last block runs
    the finish. The CPU composite's values, a launch fewer than the default set's, the same bits
    on every run whichever blocks come last (the emulator shuffles the block order by seed), and
    the ticket counters left at 0 for the next call (a second call would find no last block)."""
    case = _tail_case(B, K, Cs, Ct)
    launches, runs = [], []
    for next_set, seed in ((False, 11), (True, 11), (True, 12), (True, 13)):
        kernels._emu_configure(next_set, seed)
        before = kernels._emu_launches()
        got = check_tail(kernels, *case, metric, normalize, "mean")
        launches.append(kernels._emu_launches() - before)
        if next_set:
            runs.append(got)
    kernels._emu_configure(False, 11)
    assert launches[1:] == [launches[0] - 1] * 3
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tail_options(tail_kernels, metric, normalize, reduction):
    """Every metric x normalize x reduction; odd B, C of student and teacher apart and off the
    tile widths, absent classes and classes present in one network only."""
    check_tail(tail_kernels, *_tail_case(3, 7, 37, 19), metric, normalize, reduction)


@pytest.mark.parametrize("K, Cs, Ct", [
    (2, 5, 3),       # one 16-tile, mostly padding
    (17, 150, 70),   # T = 16: 2 x 2 tiles (3 tile pairs); 2 channel chunks of 128; 3 backward c-tiles
    (64, 20, 9),     # T = 16: 4 x 4 tiles exactly
    (65, 70, 130),   # T = 32: 3 tiles a side; channel chunks of 64, 2 and 3 of them
    (257, 40, 33),   # T = 64: 5 tiles a side; 5 backward i-tiles; chunks of 32
])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_tail_tile_counts(tail_kernels, K, Cs, Ct, metric):
    check_tail(tail_kernels, *_tail_case(2, K, Cs, Ct, seed=K), metric, True, "mean")


def test_tail_2048_classes(tail_kernels):
    """K = 2048, the largest supported in tests (T = 64: 32 tiles a side, 528 tile pairs), with
    P = 300 present classes < K spread over the tiles; 32 backward i-tiles (the c-tiles: above)."""
    K = 2048
    ss, sc, ts, tc = _tail_case(1, K, 8, 6, absent=0.0, seed=5)
    keep = torch.zeros(K, dtype=torch.bool)
    keep[torch.randperm(K, generator=torch.Generator().manual_seed(0))[:300]] = True
    sc, tc = sc * keep, tc * keep
    tc[0, keep.nonzero()[:3, 0]] = 0  # a few classes present in the student only
    ss, ts = ss * (sc > 0)[..., None], ts * (tc > 0)[..., None]
    check_tail(tail_kernels, ss, sc, ts, tc, "sqeuclidean", True, "none")


def test_tail_images_with_few_classes(tail_kernels):
    """Image 0: no class present; image 1: one class (no pair, no student entry); image 2: two
    student classes of which the teacher has one; image 3 normal. Both reductions that divide."""
    ss, sc, ts, tc = _tail_case(4, 9, 11, 7, absent=0.0, seed=2)
    sc[0], tc[0] = 0, 0
    sc[1], tc[1] = 0, 0
    sc[1, 4], tc[1, 4] = 3, 5
    sc[2], tc[2] = 0, 0
    sc[2, 1], sc[2, 8], tc[2, 8] = 2, 7, 4
    ss, ts = ss * (sc > 0)[..., None], ts * (tc > 0)[..., None]
    for metric in ("euclidean", "cosine"):
        for reduction in ("mean", "none"):
            check_tail(tail_kernels, ss, sc, ts, tc, metric, True, reduction)
    # K = 1: a single 16-tile with no off-diagonal entry
    check_tail(tail_kernels, ss[:, 4:5], sc[:, 4:5], ts[:, 4:5], tc[:, 4:5], "euclidean", True, "mean")
    # no student channel: every centroid 0
    check_tail(tail_kernels, ss[..., :0], sc, ts, tc, "sqeuclidean", True, "mean")


@pytest.mark.parametrize("K", [19, 65])  # 16-tiles: 3 tile pairs; 32-tiles: 6; rows past them no tile owns
def test_tail_writes_every_stats_element(tail_kernels, poisoned_empties, K):
    """stats comes from at::empty: rows 0..P-1 hold the tiles' partials, row K the image's values,
    and the finish kernel zeroes rows P..K-1, which no tile owns, so that no element of the op's
    output is left uninitialised (NaN here)."""
    ss, sc, ts, tc = _tail_case(2, K, 5, 7, seed=K)
    for normalize in (False, True):
        stats = tail_kernels.idd_tail(ss, sc, ts, tc, "euclidean", normalize, 1e-8, "mean", torch.float32)[2]
        assert stats.shape == (2, K + 1, CPU.idd_tail(ss, sc, ts, tc, "euclidean", normalize, 1e-8, "mean")[2].shape[2])
        assert torch.isfinite(stats).all()


def test_tail_strided_inputs(tail_kernels):
    """Sums and counts read through their strides (class-major sums, every other count) and a
    strided gradient of reduction="none"."""
    ss, sc, ts, tc = _tail_case(3, 10, 13, 6, seed=4)
    ss = ss.transpose(1, 2).contiguous().transpose(1, 2)
    sc = torch.stack([sc, sc], -1)[..., 0]
    ts = ts[..., ::2]
    grad = (torch.rand(6) + 0.5)[::2]
    assert not (ss.is_contiguous() or sc.is_contiguous() or ts.is_contiguous() or grad.is_contiguous())
    for metric in ("euclidean", "cosine"):
        check_tail(tail_kernels, ss, sc, ts, tc, metric, True, "none", grad=grad)


@pytest.mark.parametrize("sums_dtype, dtype", [
    (torch.float64, None),            # (double, double)
    (torch.float64, torch.float32),   # (double sums, float math)
    (torch.float32, torch.float64),   # not fused: the composite
    (torch.float16, None),            # not fused: the composite
])
def test_tail_dtypes(tail_kernels, sums_dtype, dtype):
    case = _tail_case(3, 10, 21, 13, dtype=sums_dtype, seed=7)
    tol = 1e-9 if (dtype or sums_dtype) == torch.float64 else 1e-5
    fused = sums_dtype == torch.float64
    for metric in ("euclidean", "cosine"):
        check_tail(tail_kernels, *case, metric, True, "sum", dtype=dtype, rtol=tol, atol=tol, fused=fused)


@pytest.mark.parametrize("K", [65, 257])  # T = 32 and T = 64
@pytest.mark.parametrize("dtype", [torch.float32, None])
def test_tail_wide_tiles_from_float64_sums(tail_kernels, K, dtype):
    """The T = 32 and T = 64 tiles over float64 sums, as the class-sum path gives them (float32
    math for float32 features, float64 for float64): test_tail_tile_counts reaches these tile
    widths with float32 sums only."""
    case = _tail_case(2, K, 40, 33, dtype=torch.float64, seed=K)
    tol = 1e-9 if dtype is None else 1e-5
    for metric in ("euclidean", "cosine"):
        check_tail(tail_kernels, *case, metric, True, "mean", dtype=dtype, rtol=tol, atol=tol)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, None])
def test_tail_coincident_centroids(tail_kernels, metric, dtype):
    """Classes whose centroids coincide, exactly or to the last bits: the squared distance
    |ci|^2 + |cj|^2 - 2 <ci, cj> then rounds to 0 or below, which the kernel clamps to 0 (and
    euclidean's eps keeps the root's gradient finite). Both networks share the near-duplicates,
    so the loss stays comparable across the two summation orders."""
    ss, sc, ts, tc = _tail_case(2, 9, 24, 17, dtype=torch.float64, absent=0.0, seed=3)
    for sums, counts in ((ss, sc), (ts, tc)):  # class 0, the centring anchor, stays apart
        counts[:, 5:8] = counts[:, 4:5]
        sums[:, 4] += 40 * counts[:, 4:5]                          # far from the anchor
        sums[:, 5] = sums[:, 4]                                   # exactly equal
        sums[:, 6] = sums[:, 4] * (1 + 2.0 ** -40)                # apart in the last bits
        sums[:, 7] = sums[:, 4] * (1 - 3 * 2.0 ** -45)
    grad = torch.tensor([0.7, 1.3], dtype=torch.float64 if dtype is None else dtype)
    got = check_tail(tail_kernels, ss, sc, ts, tc, metric, False, "none", dtype=dtype, grad=grad,
                     rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got[0]).all()
    if metric != "cosine":  # 1 - cos may round below 0 on every device
        assert (got[1] >= 0).all()


@pytest.mark.parametrize("normalize", [None, "mean"])
def test_tail_student_near_teacher(tail_kernels, normalize):
    """float64, teacher = student + 1e-6 noise: the loss, a sum of tiny E^2, matches the float64
    reference to 1e-8 (the normalize loss once came from R_s^2 - 2 R_s R_t + R_t^2 sums, which
    cancel: 4e-3 here)."""
    ss, sc, _, _ = _tail_case(2, 12, 8, 8, dtype=torch.float64, absent=0.2, seed=5)
    ts = ss + 1e-6 * randn(*ss.shape, seed=3, dtype=torch.float64) * sc[..., None]
    for metric in ("euclidean", "cosine"):
        loss = tail_kernels.idd_tail(ss, sc, ts, sc, metric, normalize is not None, 1e-8, "none", None)[0]
        want = _reference_from_sums(ss, sc, ts, sc, metric, normalize, "none")
        torch.testing.assert_close(loss, want, rtol=1e-8, atol=0)


def test_tail_eps(tail_kernels):
    """Cosine with a zero centroid (a present class whose sum is 0: the norm product clamps to
    eps), and a student whose centroids all coincide (mean distance <= eps: m_s clamped, kappa 0)."""
    ss, sc, ts, tc = _tail_case(2, 6, 9, 5, absent=0.0, seed=3)
    ss[0, 2] = 0
    ts[1, 4] = 0
    for normalize in (False, True):
        check_tail(tail_kernels, ss, sc, ts, tc, "cosine", normalize, "mean")
    same = (ss[:, :1] / sc[:, :1, None]) * sc[..., None]
    for metric in ("euclidean", "sqeuclidean"):
        got = check_tail(tail_kernels, same, sc, ts, tc, metric, True, "none", eps=1e-6)
        assert (got[2][:, -1, 0] == 1e-6).all() and (got[2][:, -1, 3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_tail_common_offset(tail_kernels, dtype, metric):
    """float64 sums of features 1e4 + a small spread: the centroids' shift cancels the offset
    before any rounding, so the loss and gradient match the float64 reference (computed far from
    the offset) to the compute dtype's precision."""
    ss, sc, ts, tc = _tail_case(3, 12, 24, 10, dtype=torch.float64, seed=9)

    def offset(sums, counts):  # sums of count_k features whose mean is 1e4 + 1e-2 * centroid_k
        present = (counts > 0)[..., None]
        return torch.where(present, (1e4 + 1e-2 * sums / counts.clamp_min(1)[..., None]) * counts[..., None], 0.0)

    ss, ts = offset(ss, sc), offset(ts, tc)
    for normalize, reduction in ((None, "mean"), ("mean", "none")):
        loss, dist, stats = tail_kernels.idd_tail(ss, sc, ts, tc, metric, normalize is not None, 1e-8, reduction, dtype)
        x = ss.clone().requires_grad_()
        want = _reference_from_sums(x, sc, ts, tc, metric, normalize, reduction)
        (g_want,) = torch.autograd.grad(want.sum(), x)
        tol = 1e-7 if dtype == torch.float64 else 2e-4
        torch.testing.assert_close(loss.double(), want, rtol=tol, atol=0)
        grad = torch.ones_like(loss)
        g = tail_kernels._idd_tail_backward(grad, ss, sc, tc, dist, stats, metric, normalize is not None, 1e-8, reduction)
        torch.testing.assert_close(g, g_want, rtol=tol, atol=tol * float(g_want.abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tail_float64_math_with_a_float32_loss(tail_kernels, reduction):
    """What the library asks for (METHOD.md 8): float64 sums and K x K math, the loss written in
    float32 by the finish kernel and its float32 gradient read as it comes, so that no cast is
    launched; the same values as the composite."""
    ss, sc, ts, tc = _tail_case(2, 19, 24, 40, dtype=torch.float64, seed=4)
    grad = torch.rand(2 if reduction == "none" else (), generator=torch.Generator().manual_seed(1)) + 0.5
    got = check_tail(tail_kernels, ss, sc, ts, tc, "euclidean", True, reduction, torch.float64,
                     loss_dtype=torch.float32, grad=grad)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float64


# one case per label dtype: uint8, int32, int64
LABEL_TYPE_CASES = [c for c in CASES if c.id in ("uniform-runs-uint8", "absent-classes", "mixed-warps")]


# ---- class_centroids ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_class_centroids_labels(kernels, case):
    y = case.labels()
    for dtype in (torch.float32, torch.float64):
        x = case.feats(dtype=dtype)
        got, want = kernels.class_centroids(x, y, case.K, case.ignore_index), \
            CPU.class_centroids(x, y, case.K, case.ignore_index)
        close(got, want)
        grad = randn(*want[0].shape, seed=1, dtype=want[0].dtype)
        args = (grad, y, want[1], case.H, case.W, dtype, case.ignore_index)
        close(kernels._class_centroids_backward(*args), CPU._class_centroids_backward(*args))


@pytest.mark.parametrize("case", LABEL_TYPE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_class_centroids_low_precision(kernels, case, dtype):
    """Half and bfloat16 features with uint8, int32 and int64 labels: the kernels accumulate in
    float32 and the backward writes the features' dtype."""
    y, x = case.labels(), case.feats(dtype=dtype)
    got, want = kernels.class_centroids(x, y, case.K, case.ignore_index), \
        CPU.class_centroids(x, y, case.K, case.ignore_index)
    close(got, want, rtol=1e-4, atol=1e-4)
    args = (randn(*want[0].shape, seed=1, dtype=want[0].dtype), y, want[1], case.H, case.W, dtype, case.ignore_index)
    close(kernels._class_centroids_backward(*args), CPU._class_centroids_backward(*args), rtol=1e-2, atol=1e-2)


def test_class_centroids_deterministic(kernels):
    """torch.use_deterministic_algorithms(True): the CUDA op takes its ordered path."""
    case = CASES[IDS.index("mixed-warps-resized")]
    x, y = case.feats(dtype=torch.float32), case.labels()
    before = kernels._emu_launches()
    try:
        torch.use_deterministic_algorithms(True)
        got = kernels.class_centroids(x, y, case.K, 255)
    finally:
        torch.use_deterministic_algorithms(False)
    assert kernels._emu_launches() == before  # no fused kernel ran
    close(got, CPU.class_centroids(x, y, case.K, 255))


def test_class_centroids_many_classes(kernels):
    """K past the default 48 KiB of per-class sums: the launch opts in to more shared memory.
    Labels read through their strides (every other row and column of a larger map)."""
    K = 1600
    y = torch.randint(0, K, (1, 16, 80), generator=torch.Generator().manual_seed(0))[:, ::2, ::2]
    x = randn(1, 9, 8, 40)
    assert not y.is_contiguous()
    close(kernels.class_centroids(x, y, K, 255), CPU.class_centroids(x, y, K, 255))
    _, counts = CPU.class_centroids(x, y, K, 255)
    args = (randn(1, K, 9, seed=1), y, counts, 8, 40, torch.float32, 255)
    close(kernels._class_centroids_backward(*args), CPU._class_centroids_backward(*args))


def test_class_centroids_backward_zero_counts(kernels):
    """Counts passed to the backward op that call a present class empty: the pixels of that class
    get a zero gradient, as on the CPU (no division by 0)."""
    case = CASES[IDS.index("mixed-warps-resized")]
    x, y = case.feats(dtype=torch.float32), case.labels()
    _, counts = CPU.class_centroids(x, y, case.K, 255)
    b, k = (counts > 0).nonzero()[0].tolist()
    counts[b, k] = 0
    args = (randn(*counts.shape, x.shape[1], seed=1), y, counts, case.H, case.W, torch.float32, 255)
    got = kernels._class_centroids_backward(*args)
    emptied = CPU._label_slots(y, case.H, case.W, case.K, 255)[b] == k  # [H, W]
    assert emptied.any() and (got[b][:, emptied] == 0).all()
    close(got, CPU._class_centroids_backward(*args))
