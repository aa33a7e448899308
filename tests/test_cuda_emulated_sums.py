"""The CUDA class-sum kernels (class_sums, class_sums_pair, _label_slots; csrc/cuda/class_sums*.cu/cuh,
label_slots_cuda.cu) run by the emulator of tests/cuda_emu, branch by branch: every test names the
branch it reaches, and the class-sum tests check, from the emulator's launch log (blocks, threads,
dynamic shared bytes), that the host chose that plan. The backward: test_cuda_emulated_sums_backward.py.

Plans (class_sums_cuda.cu) on the emulated GPU (227 KiB opt-in shared memory, 132 SMs):
  P  NCHW, K * (2 ch x 256 thr x acc + 4) <= 48 KiB: 256 threads;
  W  NCHW past P: K * (warps x 2 x acc + 4) <= 227 KiB with 4, 2 or 1 warps; an error past 1;
  L  channels_last, K * (4 warps x 32 x VEC x acc + 4) <= 96 KiB (16-byte lanes, VEC = 16 / elem)
     or with VEC = 1 (one channel per lane); past both an NCHW copy takes P or W.
acc is 8 bytes for float64 features, 4 otherwise. Vector (16-byte) paths need an aligned base
and HW (NCHW) or C (channels_last) a multiple of the pack; the emulator raises on a misaligned
vector access, so the misaligned cases also check that the host chose the scalar path.
Results are compared with the CPU op of the same name; precision cases with the float64 reference.
"""
import pytest
import torch

from conftest import make_labels
from idd_ops import reference
from test_cuda_emulated import CPU, close, emu  # noqa: F401  (emu: the module's fixture)

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
COMBINE = (256, 0)  # combine_segments_kernel: kThreads, no dynamic shared memory


@pytest.fixture
def ops(emu):
    """The emulated ops, with an empty launch log."""
    emu._emu_configure(False, 11)
    emu._emu_launch_log()
    return emu


def launches(ops):
    log = ops._emu_launch_log()
    return [tuple(log[i:i + 3]) for i in range(0, len(log), 3)]


def acc(dtype):
    return 8 if dtype == f64 else 4


def pack(dtype):
    return 16 // torch.empty(0, dtype=dtype).element_size()


def plan_private(K, dtype):
    return 256, K * (2 * 256 * acc(dtype) + 4)


def plan_warp(K, dtype, warps):
    return 32 * warps, K * (warps * 2 * acc(dtype) + 4)


def plan_last(K, dtype, vector):
    return 128, K * (4 * 32 * (pack(dtype) if vector else 1) * acc(dtype) + 4)


def feats(B, C, H, W, dtype=f32, layout="nchw", seed=0, offset=0.0):
    """layout: nchw, cl (channels_last), or nchw_off / cl_off: the same layout starting one
    element into its storage (not 16-byte aligned)."""
    g = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(B, C, H, W, generator=g, dtype=f64)).to(dtype)
    if layout.startswith("cl"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout.endswith("_off"):
        buf = torch.empty(x.numel() + 1, dtype=dtype)
        view = buf[1:].as_strided(x.shape, x.stride())
        view.copy_(x)
        assert view.data_ptr() % 16 != 0
        x = view
    return x


def slots(B, H, W, K, seed=0, blocky=True):
    return CPU._label_slots(make_labels(B, H, W, K, blocky=blocky, seed=seed), H, W, K, 255)


def tiles(C, dtype, plan_threads, shared, K):
    """Channel tiles of a plan: 2 channels (P, W) or 32 lanes x VEC (L) per block."""
    for vector in (True, False):
        if (plan_threads, shared) == plan_last(K, dtype, vector):
            lanes = 32 * (pack(dtype) if vector else 1)
            return -(-C // lanes)
    return -(-C // 2)


# (id naming the branch, B, C, H, W, K, dtype, layout, expected plan, split into segments)
CASES = [
    ("P-vec", 2, 5, 8, 12, 7, f32, "nchw", plan_private(7, f32), False),
    ("P-vec-f64-at-limit", 2, 3, 8, 8, 11, f64, "nchw", plan_private(11, f64), False),
    ("P-vec-half-at-limit", 2, 3, 8, 8, 23, f16, "nchw", plan_private(23, f16), False),
    ("P-vec-bf16", 1, 4, 4, 6, 5, bf16, "nchw", plan_private(5, bf16), False),
    ("P-scalar-odd-HW", 2, 3, 7, 9, 7, f32, "nchw", plan_private(7, f32), False),
    ("P-scalar-offset", 2, 4, 8, 12, 7, f32, "nchw_off", plan_private(7, f32), False),
    ("P-scalar-offset-f64", 1, 3, 4, 8, 7, f64, "nchw_off", plan_private(7, f64), False),
    ("P-scalar-half-odd-HW", 2, 3, 7, 9, 7, f16, "nchw", plan_private(7, f16), False),
    ("P-scalar-bf16-offset", 1, 3, 4, 8, 5, bf16, "nchw_off", plan_private(5, bf16), False),
    ("P-vec-split", 1, 3, 64, 64, 7, f32, "nchw", plan_private(7, f32), True),
    ("P-vec-split-half-seg-rounded", 1, 2, 8, 257, 5, f16, "nchw", plan_private(5, f16), True),
    ("P-scalar-split", 1, 2, 45, 47, 7, f32, "nchw", plan_private(7, f32), True),
    # one segment of two 16-byte steps for most threads, one for the last 12: both loaded first
    ("P-vec-two-steps-ahead", 1, 3, 40, 50, 7, f32, "nchw", plan_private(7, f32), False),
    ("W4-vec-past-P", 2, 3, 8, 16, 24, f32, "nchw", plan_warp(24, f32, 4), False),
    ("W4-vec-f64-past-P", 2, 3, 8, 8, 12, f64, "nchw", plan_warp(12, f64, 4), False),
    ("W4-vec-bf16", 1, 2, 4, 8, 40, bf16, "nchw", plan_warp(40, bf16, 4), False),
    ("W4-scalar-offset", 2, 3, 7, 9, 30, f32, "nchw_off", plan_warp(30, f32, 4), False),
    ("W4-vec-half", 1, 2, 4, 8, 40, f16, "nchw", plan_warp(40, f16, 4), False),
    ("W4-scalar-half-odd-HW", 1, 3, 5, 7, 30, f16, "nchw", plan_warp(30, f16, 4), False),
    ("W4-scalar-bf16-offset", 1, 2, 4, 8, 30, bf16, "nchw_off", plan_warp(30, bf16, 4), False),
    # a segment of 129 = 4 x 32 + 1 pixels (scalar): the warps' shares must round up (4 x 64),
    # not down (4 x 32 left the last pixel unsummed; 65 = 2 x 32 + 1 on 2 warps: mutation-checked)
    ("W4-scalar-one-past-the-warp-shares", 1, 3, 3, 43, 30, f32, "nchw", plan_warp(30, f32, 4), False),
    ("W2-scalar-one-past-the-warp-shares", 1, 2, 5, 13, 8000, f32, "nchw", plan_warp(8000, f32, 2), False),
    ("W4-vec-split", 1, 2, 64, 64, 24, f32, "nchw", plan_warp(24, f32, 4), True),
    ("W4-vec-at-4-warp-limit", 1, 2, 4, 4, 6456, f32, "nchw", plan_warp(6456, f32, 4), False),
    ("W2-vec", 1, 3, 4, 8, 8000, f32, "nchw", plan_warp(8000, f32, 2), False),
    ("W2-scalar-f64", 1, 3, 3, 5, 5000, f64, "nchw", plan_warp(5000, f64, 2), False),
    ("W1-vec", 1, 3, 4, 8, 15000, f32, "nchw", plan_warp(15000, f32, 1), False),
    ("W1-at-f32-limit", 1, 2, 4, 4, 19370, f32, "nchw", plan_warp(19370, f32, 1), False),
    ("W1-at-f64-limit", 1, 2, 4, 4, 11622, f64, "nchw", plan_warp(11622, f64, 1), False),
    ("L-vec", 2, 40, 6, 10, 7, f32, "cl", plan_last(7, f32, True), False),
    ("L-vec-two-tiles", 1, 136, 4, 5, 3, f32, "cl", plan_last(3, f32, True), False),
    ("L-vec-half", 2, 24, 5, 6, 7, f16, "cl", plan_last(7, f16, True), False),
    ("L-vec-f64-at-limit", 1, 6, 5, 6, 47, f64, "cl", plan_last(47, f64, True), False),
    ("L-vec-f32-at-limit", 1, 8, 5, 6, 47, f32, "cl", plan_last(47, f32, True), False),
    ("L-lane-past-vec-limit", 1, 8, 4, 5, 48, f32, "cl", plan_last(48, f32, False), False),
    ("L-lane-odd-C", 2, 5, 6, 7, 7, f32, "cl", plan_last(7, f32, False), False),
    ("L-lane-f64-odd-C", 1, 5, 4, 6, 7, f64, "cl", plan_last(7, f64, False), False),
    ("L-lane-offset", 2, 8, 4, 6, 7, f32, "cl_off", plan_last(7, f32, False), False),
    ("L-lane-bf16-C-not-pack", 1, 12, 4, 5, 7, bf16, "cl", plan_last(7, bf16, False), False),
    ("L-lane-two-tiles", 1, 40, 3, 5, 60, f32, "cl", plan_last(60, f32, False), False),
    ("L-lane-at-limit", 1, 8, 4, 5, 190, f32, "cl", plan_last(190, f32, False), False),
    ("L-fallback-to-W", 1, 4, 4, 5, 191, f32, "cl", plan_warp(191, f32, 4), False),
    ("L-fallback-to-W-f64", 1, 3, 4, 5, 96, f64, "cl", plan_warp(96, f64, 4), False),
    ("L-vec-split", 1, 8, 16, 20, 7, f32, "cl", plan_last(7, f32, True), True),
    ("L-lane-split-many", 1, 3, 64, 80, 2, f32, "cl", plan_last(2, f32, False), True),
]


@pytest.mark.parametrize("B,C,H,W,K,dtype,layout,plan,split", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_class_sums_plans(ops, B, C, H, W, K, dtype, layout, plan, split):
    """Each strategy (P, W with 4/2/1 warps, L with 16-byte lanes or one channel per lane, L's
    NCHW fallback), vector and scalar, whole or split into segments (then the combine kernel)."""
    x, s = feats(B, C, H, W, dtype, layout), slots(B, H, W, K, blocky=K < 1000)
    close(ops.class_sums(x, s, K), CPU.class_sums(x, s, K))
    log = launches(ops)
    blocks, threads, shared = log[0]
    assert (threads, shared) == plan
    whole = B * tiles(C, dtype, threads, shared, K)
    assert (blocks > whole) == split and blocks % whole == 0
    assert log[1:] == ([(log[1][0], *COMBINE)] if split else [])


def test_class_sums_seeds_and_random_slots(emu):
    """W's per-class butterflies with every lane on a different class (scalar chunks), and P's
    runs of length 1, under three block/thread orders."""
    x, s = feats(2, 3, 8, 12), slots(2, 8, 12, 30, blocky=False)
    xp, sp = feats(2, 3, 8, 12, seed=1), slots(2, 8, 12, 7, blocky=False)
    for seed in (1, 2, 3):
        emu._emu_configure(False, seed)
        close(emu.class_sums(x, s, 30), CPU.class_sums(x, s, 30))
        close(emu.class_sums(xp, sp, 7), CPU.class_sums(xp, sp, 7))


# (id, a: (C, H, W, dtype, layout), b: ..., K, sum-kernel launches, combine launches)
PAIRS = [
    ("equal-P-plans-one-launch", (5, 8, 12, f32, "nchw"), (9, 6, 10, f32, "nchw"), 7, 1, 0),
    ("equal-P-plans-both-split-one-combine", (2, 64, 64, f32, "nchw"), (3, 64, 32, f32, "nchw"), 7, 1, 1),
    ("equal-P-plans-second-split", (3, 8, 12, f32, "nchw"), (2, 32, 64, f32, "nchw"), 7, 1, 1),
    ("P-vec-and-P-scalar-two-launches-second-split", (3, 8, 12, f32, "nchw"), (2, 45, 47, f32, "nchw"), 7, 2, 1),
    ("equal-W-plans-one-launch", (3, 8, 12, f32, "nchw"), (4, 6, 10, f32, "nchw"), 30, 1, 0),
    ("W-vec-and-W-scalar-two-launches", (3, 8, 12, f32, "nchw"), (4, 7, 9, f32, "nchw_off"), 30, 2, 0),
    ("equal-L-plans-one-launch", (40, 6, 10, f32, "cl"), (12, 4, 5, f32, "cl"), 7, 1, 0),
    ("dtypes-differ-two-launches", (3, 8, 12, f32, "nchw"), (4, 8, 12, f64, "nchw"), 7, 2, 0),
    ("layouts-differ-two-launches", (8, 6, 10, f32, "cl"), (8, 6, 10, f32, "nchw"), 7, 2, 0),
    ("L-vec-and-L-lane-two-launches-second-split", (8, 6, 10, f32, "cl"), (5, 16, 20, f32, "cl"), 7, 2, 1),
    ("second-empty-map", (3, 8, 12, f32, "nchw"), (3, 0, 12, f32, "nchw"), 7, 1, 0),
    ("second-no-channels", (3, 8, 12, f32, "nchw"), (0, 8, 12, f32, "nchw"), 7, 1, 0),
]


@pytest.mark.parametrize("a,b,K,sum_launches,combines", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_class_sums_pair(ops, a, b, K, sum_launches, combines):
    """class_sums_pair: both passes in one grid where dtype and plan agree, else one each; the
    segments of every split pass added by one combine launch."""
    B = 2
    xa, xb = feats(B, *a[:3], a[3], a[4]), feats(B, *b[:3], b[3], b[4], seed=1)
    sa, sb = slots(B, *a[1:3], K), (slots(B, *b[1:3], K, seed=1) if b[1] else torch.empty(B, 0, b[2], dtype=torch.int16))
    close(ops.class_sums_pair(xa, sa, xb, sb, K), CPU.class_sums_pair(xa, sa, xb, sb, K))
    log = launches(ops)
    assert len(log) == sum_launches + combines
    assert [t[1:] == COMBINE for t in log] == [False] * sum_launches + [True] * combines


@pytest.mark.parametrize("B,C,H,W,layout", [(2, 3, 0, 5, "nchw"), (2, 0, 4, 5, "nchw"), (0, 3, 4, 5, "nchw"),
                                            (2, 0, 4, 5, "cl"), (2, 3, 5, 0, "cl"), (0, 0, 4, 5, "nchw")],
                         ids=["HW0", "C0", "B0", "C0-cl", "HW0-cl", "B0-C0"])
def test_class_sums_empty(ops, B, C, H, W, layout):
    """Nothing to launch: zero sums, and the counts from the slots alone where only C is 0."""
    x = feats(B, C, H, W, f32, layout)
    s = slots(B, H, W, 5) if B * H * W else torch.empty(B, H, W, dtype=torch.int16)
    close(ops.class_sums(x, s, 5), CPU.class_sums(x, s, 5))
    assert launches(ops) == []


@pytest.mark.parametrize("bad", [5, -2])
def test_class_sums_no_channels_slot_out_of_range(ops, bad):
    """C == 0 counts the slots without a kernel: a slot outside [-1, K) must still stop it, not
    count as ignored."""
    s = torch.zeros(1, 2, 3, dtype=torch.int16)
    s[0, 1, 1] = bad
    with pytest.raises(RuntimeError, match="slots: a value is outside"):
        ops.class_sums(torch.zeros(1, 0, 2, 3), s, 5)


@pytest.mark.parametrize("K,layout", [(7, "nchw"), (30, "nchw"), (7, "cl")], ids=["P", "W", "L"])
def test_class_sums_non_finite(ops, K, layout):
    """inf and NaN at the image's first pixel (pivot 0 for that channel) and elsewhere: the same
    non-finite sums as the CPU, every other sum finite."""
    x = feats(2, 8, 6, 8, f32, layout).clone()
    x[0, 1, 0, 0], x[0, 2, 0, 0], x[1, 3, 2, 5], x[1, 4, 0, 0] = float("inf"), float("nan"), float("-inf"), float("inf")
    x[1, 4, 3, 3] = float("-inf")
    s = slots(2, 6, 8, K)
    (got, got_n), (want, want_n) = ops.class_sums(x, s, K), CPU.class_sums(x, s, K)
    assert torch.equal(got_n, want_n) and torch.equal(got.isnan(), want.isnan())
    assert want.isnan().any() and want.isinf().any() and torch.isfinite(want).any()
    fin = torch.isfinite(want)
    assert torch.equal(got[~fin & ~want.isnan()], want[~fin & ~want.isnan()])
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K,layout", [(7, "nchw"), (30, "nchw"), (7, "cl")], ids=["P", "W", "L"])
def test_class_sums_copied_inputs(ops, K, layout):
    """Inputs the host copies first: slots misaligned for vector loads (a storage offset: cloned)
    and strided features (one NCHW copy); every pixel ignored in one image."""
    s = slots(2, 8, 12, K)
    s[1] = -1
    buf = torch.empty(s.numel() + 1, dtype=torch.int16)
    s_off = buf[1:].view(s.shape)
    s_off.copy_(s)
    x = feats(2, 8, 8, 12, f32, layout)
    close(ops.class_sums(x, s_off, K), CPU.class_sums(x, s, K))
    strided = feats(2, 16, 8, 12, f32, layout)[:, ::2]
    close(ops.class_sums(strided, s_off, K), CPU.class_sums(strided, s, K))


@pytest.mark.parametrize("K,dtype,layout", [(19371, f32, "nchw"), (11623, f64, "nchw"), (19371, f32, "cl")],
                         ids=["f32-past-W1", "f64-past-W1", "cl-fallback-past-W1"])
def test_class_sums_past_shared_memory(ops, K, dtype, layout):
    """Past one warp's sums in the GPU's opt-in shared memory: a clear error, no launch."""
    x, s = feats(1, 2, 2, 2, dtype, layout), torch.zeros(1, 2, 2, dtype=torch.int16)
    with pytest.raises(ValueError, match="num_classes: .* shared memory"):
        ops.class_sums(x, s, K)
    assert launches(ops) == []


@pytest.mark.parametrize("case", [("P", 7, f32, "nchw"), ("P-f64", 7, f64, "nchw"), ("P-half", 7, f16, "nchw"),
                                  ("W", 40, f32, "nchw"), ("W-f64", 40, f64, "nchw"), ("L-vec", 7, f32, "cl"),
                                  ("L-lane", 60, f32, "cl"), ("L-f64", 7, f64, "cl"), ("L-bf16", 7, bf16, "cl"),
                                  ("P-split", 7, f32, "nchw", (1, 2, 64, 64)), ("W-split", 24, f32, "nchw", (1, 2, 64, 64)),
                                  ("L-split", 7, f32, "cl", (1, 8, 16, 20))],
                         ids=lambda c: c[0])
def test_class_sums_common_offset(ops, case):
    """Features = offset + unit spread: the float64 sums hold the offset (x - pivot summed in the
    accumulation dtype, segments added in float64), so the centroids match the float64 reference
    of the same values to the spread's rounding; summing raw float32 values of 1e4 would be ~1e-3
    off."""
    _, K, dtype, layout, *shape = case
    B, C, H, W = shape[0] if shape else (2, 8, 16, 20)
    offset = {f32: 1e4, f64: 1e6, f16: 1e3, bf16: 1e2}[dtype]
    tol = {f32: 2e-5, f64: 1e-8, f16: 2e-5, bf16: 2e-5}[dtype]
    x, s = feats(B, C, H, W, dtype, layout, offset=offset), slots(B, H, W, K)
    sums, counts = ops.class_sums(x, s, K)
    ref_sums, ref_counts = reference.class_sums(x.double(), s, K)
    assert torch.equal(counts, ref_counts)
    n = counts.clamp_min(1)[..., None].double()
    torch.testing.assert_close(sums / n, ref_sums / n, rtol=0, atol=tol)


@pytest.mark.parametrize("bad,K,C,H,W,layout", [(7, 7, 3, 8, 12, "nchw"), (-2, 7, 3, 8, 12, "nchw"),
                                                (30, 30, 3, 7, 9, "nchw"), (-3, 30, 3, 8, 16, "nchw"),
                                                (7, 7, 8, 4, 5, "cl"), (-2, 60, 5, 4, 5, "cl")],
                         ids=["P-K", "P-minus2", "W-K", "W-minus3", "L-K", "L-minus2"])
def test_class_sums_slot_out_of_range(ops, bad, K, C, H, W, layout):
    """A slot outside [-1, K) stops P, W and L with a device assert (the CPU raises ValueError)."""
    x, s = feats(1, C, H, W, f32, layout), slots(1, H, W, K)
    s[0, H - 1, W - 1] = bad
    with pytest.raises(RuntimeError, match="slots: a value is outside"):
        ops.class_sums(x, s, K)
    with pytest.raises(ValueError, match="slots"):
        CPU.class_sums(x, s, K)


def test_class_sums_too_large(ops):
    """Past the kernels' 32-bit pixel and channel indices: a clear error before any copy (the
    inputs are expanded views, so nothing that large is allocated)."""
    x = torch.zeros(1, 1, 1, 1).expand(1, 2, 2 ** 15, 2 ** 15)
    s = torch.zeros(1, 1, 1, dtype=torch.int16).expand(1, 2 ** 15, 2 ** 15)
    with pytest.raises(ValueError, match="feats: at most 2\\^31"):
        ops.class_sums(x, s, 3)
    assert launches(ops) == []


# ---- _label_slots -----------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("size,label_size", [((16, 20), (32, 40)), ((9, 13), (5, 7)), ((7, 11), (7, 11)),
                                             ((5, 3), (1, 1)), ((3, 17), (13, 5))],
                         ids=["down", "up-odd", "same-odd", "up-from-1x1", "mixed"])
@pytest.mark.parametrize("ignore_index", [255, -1])
def test_label_slots(ops, label_dtype, size, label_size, ignore_index):
    """Nearest resize down, up and at the same size (odd sizes), ignore_index 255 and negative."""
    if label_dtype == torch.uint8 and ignore_index < 0:
        y = make_labels(2, *label_size, 6).clamp_max(5)  # no ignored pixels: uint8 cannot hold -1
    else:
        y = make_labels(2, *label_size, 6)
        y[y == 255] = ignore_index
    y = y.to(label_dtype)
    got = ops._label_slots(y, *size, 6, ignore_index)
    assert torch.equal(got, CPU._label_slots(y, *size, 6, ignore_index))
    assert torch.equal(got.long(), reference.label_slots(y.long(), size, 6, ignore_index))


def test_label_slots_strided_labels(ops):
    y = make_labels(2, 13, 9, 5).transpose(1, 2)  # [2, 9, 13], not contiguous
    assert torch.equal(ops._label_slots(y, 4, 7, 5, 255), CPU._label_slots(y, 4, 7, 5, 255))


def test_label_slots_empty(ops):
    y = make_labels(2, 4, 4, 5)
    assert ops._label_slots(y, 0, 3, 5, 255).shape == (2, 0, 3) and launches(ops) == []


@pytest.mark.parametrize("label_dtype,bad,ignore_index", [(torch.int64, 6, 255), (torch.int32, -1, 255),
                                                          (torch.uint8, 255, -1), (torch.int64, 255, -100)])
def test_label_slots_out_of_range(ops, label_dtype, bad, ignore_index):
    """A label outside [0, K) that is not ignore_index stops the kernel (device assert)."""
    y = make_labels(1, 5, 7, 6).clamp_max(5)
    y[0, 4, 6] = bad
    y = y.to(label_dtype)
    with pytest.raises(RuntimeError, match="labels: a value is outside"):
        ops._label_slots(y, 5, 7, 6, ignore_index)
    with pytest.raises(ValueError, match="labels"):
        CPU._label_slots(y, 5, 7, 6, ignore_index)
