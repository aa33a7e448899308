"""softmax_kl on the CUDA emulator (tests/cuda_emu), branch by branch, against the CPU op of the
same name and against idd_ops.reference in float64, forward and backward.

The cases reach every launch of softmax_kl_cuda.cu: CWD rows (inner == 1) a warp per row (lengths
under 32, 32..256, over 256) and a block per row (from 2 * 256 packs); pixel KD (inner > 1), the
forward a pixel per thread with chunks of classes and the backward over tiles of 256 packs and
groups of 4 classes, both on a grid whose image loop wraps. Each with 16-byte packs (the backward's
per-pixel values too, where aligned) and, where the contiguous dim is not a multiple of the pack or
the storage is offset, packs of one. Values: temperatures 1 and 4, logits ~1e3 and ramps (every
chunk raises the running maximum), and the -inf rules of docs/METHOD.md ("-inf logits"): masked
entries, a teacher vector -inf everywhere (KL 0, zero gradient: issue 22 item 5), a student vector
-inf everywhere (+inf, zero gradient).
"""
import pytest
import torch

import idd_ops  # noqa: F401
from idd_ops import reference
from test_cuda_emulated import CPU, emu, kernels  # noqa: F401  (fixtures)

ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
       torch.bfloat16: torch.float32}
# relative tolerance of an output of this dtype computed in its accumulation dtype (kl, lse: the
# accumulation dtype; the gradient: the input's dtype, rounded once at the end)
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def close(got, want, rtol):
    """got == want in infinities and NaNs, and within rtol (relative to the largest finite |want|)
    elsewhere: test_cuda_emulated.close scales its atol by max |want|, which is inf here."""
    assert got.shape == want.shape, (got.shape, want.shape)
    for pick in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(pick(got), pick(want)), f"{pick.__name__} differs"
    finite = torch.isfinite(want)
    g, w = got[finite].double(), want[finite].double()
    scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
    torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


def offset(x):
    """x's values in storage that starts one element later (not 16-byte aligned): the kernels'
    packs of one element."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    assert view.is_contiguous() and view.storage_offset() == 1
    return view


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- softmax_kl ---------------------------------------------------------------------------

def kl_reference(s, t, T, grad):
    """KL and d (sum grad * KL) / d s of [outer, length, inner] inputs by the float64 reference
    (pixel KD's KL along dim 1 of [outer, length, inner, 1] is CWD's along the row as well)."""
    s64 = s.to(torch.float64, copy=True).unsqueeze(-1).requires_grad_()
    per_vector = reference.pixel_kd_loss(s64, t.double().unsqueeze(-1), temperature=T, reduction="none")
    kl = per_vector.squeeze(-1) / T ** 2
    (kl * grad.double()).sum().backward()
    return kl.detach(), s64.grad.squeeze(-1)


def check_softmax_kl(ops, s, t, T, grad=None, slack=1.0):
    """slack: a factor on the tolerances, for logits whose float32 rounding alone (|x| eps) is
    larger than RTOL's."""
    acc = ACC[s.dtype]
    outer, _, inner = s.shape
    if grad is None:
        grad = torch.rand(outer, inner, generator=gen(3), dtype=acc) + 0.5
    got, want = ops.softmax_kl(s, t, T), CPU.softmax_kl(s, t, T)
    rtol = RTOL[acc] * slack
    for g, w, dtype in zip(got, want, (acc, torch.float64, torch.float64)):  # kl, then both lse
        assert g.dtype == dtype
        close(g, w, rtol)
    ref_kl, ref_grad = kl_reference(s, t, T, grad)
    close(got[0], ref_kl, rtol)
    dgot = ops._softmax_kl_backward(grad, s, t, got[1], got[2], T)
    dwant = CPU._softmax_kl_backward(grad, s, t, want[1], want[2], T)
    assert dgot.dtype == s.dtype
    close(dgot, dwant, RTOL[s.dtype] * slack)
    close(dgot, ref_grad, RTOL[s.dtype] * slack)
    return got, dgot


def logits(shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


# (outer, length, inner), dtype, temperature: the launch each reaches is named.
KL_CASES = [
    # CWD rows, a warp per row
    ((5, 7, 1), torch.float32, 1.0),       # length < 32, not a pack multiple: scalar
    ((9, 20, 1), torch.float32, 4.0),      # packs of 4, two blocks of 8 rows, the second partly empty
    ((6, 100, 1), torch.float32, 1.0),     # 32..256, packs
    ((4, 150, 1), torch.float32, 4.0),     # 32..256, scalar
    ((3, 1000, 1), torch.float32, 4.0),    # > 256, packs, still a warp (block from 2048)
    ((3, 301, 1), torch.float32, 1.0),     # > 256, scalar, a warp (block from 512)
    # CWD rows, a block per row
    ((2, 2048, 1), torch.float32, 4.0),    # packs, exactly 2 * 256 * 4
    ((2, 2050, 1), torch.float32, 1.0),    # scalar, several strides of the block
    ((2, 4096, 1), torch.float16, 4.0),    # packs of 8
    ((3, 1024, 1), torch.float64, 1.0),    # packs of 2
    ((2, 2052, 1), torch.float32, 4.0),    # packs; the last step pads with -inf
    ((2, 515, 1), torch.float64, 4.0),     # scalar
    ((2, 517, 1), torch.float16, 1.0),     # scalar
    ((2, 4104, 1), torch.bfloat16, 4.0),   # packs of 8, padded
    ((2, 601, 1), torch.bfloat16, 1.0),    # scalar
    # CWD rows, other dtypes
    ((3, 100, 1), torch.float64, 4.0),
    ((3, 7, 1), torch.float64, 1.0),
    ((3, 24, 1), torch.float16, 1.0),
    ((3, 100, 1), torch.float16, 4.0),     # 100 % 8: scalar
    ((3, 40, 1), torch.bfloat16, 4.0),
    ((3, 300, 1), torch.bfloat16, 1.0),
    # pixel KD: the forward a pixel per thread, the backward packs where the pixels allow
    ((2, 19, 64), torch.float32, 1.0),     # forward chunks of 8 classes (19 leaves 3); backward packs of 4
    ((2, 19, 30), torch.float32, 4.0),     # inner % 4: a scalar backward
    ((3, 5, 4), torch.float32, 1.0),
    ((2, 3, 2), torch.float32, 4.0),
    ((2, 19, 6), torch.float64, 1.0),      # packs of 2
    ((2, 7, 5), torch.float64, 4.0),
    ((2, 19, 16), torch.float16, 4.0),     # backward packs of 8
    ((2, 5, 12), torch.float16, 1.0),
    ((2, 11, 24), torch.bfloat16, 1.0),
    ((2, 7, 10), torch.bfloat16, 4.0),
    ((2, 3, 1100), torch.float32, 4.0),    # five forward tiles of 256 pixels, two backward tiles of 256 packs
]


@pytest.mark.parametrize("shape,dtype,T", KL_CASES, ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_softmax_kl_branches(kernels, shape, dtype, T):
    check_softmax_kl(kernels, logits(shape, dtype, 0), logits(shape, dtype, 1), T)


@pytest.mark.parametrize("shape", [(3, 100, 1), (2, 2048, 1), (2, 19, 64)])
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_softmax_kl_misaligned(kernels, shape, which):
    s, t = logits(shape, torch.float32, 0), logits(shape, torch.float32, 1)
    if which in ("student", "both"):
        s = offset(s)
    if which in ("teacher", "both"):
        t = offset(t)
    check_softmax_kl(kernels, s, t, 4.0)


@pytest.mark.parametrize("which", ["lse", "grad"])
def test_softmax_kl_pixel_backward_misaligned_values(kernels, which):
    """The backward's per-pixel values in storage that starts one element later: the pixel
    backward reads them one by one instead of as packs."""
    s, t = logits((2, 19, 64), torch.float32, 0), logits((2, 19, 64), torch.float32, 1)
    _, lse_s, lse_t = CPU.softmax_kl(s, t, 2.0)
    grad = torch.rand(2, 64, generator=gen(3)) + 0.5
    want = CPU._softmax_kl_backward(grad, s, t, lse_s, lse_t, 2.0)
    if which == "lse":
        lse_s, lse_t = offset(lse_s), offset(lse_t)
    else:
        grad = offset(grad)
    close(kernels._softmax_kl_backward(grad, s, t, lse_s, lse_t, 2.0), want, RTOL[torch.float32])


@pytest.mark.parametrize("shape", [(3, 100, 1), (2, 2048, 1), (2, 19, 64), (2, 19, 30)])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_softmax_kl_large_logits(kernels, shape, T):
    """Logits ~1e3 on a ramp along the vector: the running maxima keep growing from chunk to
    chunk and lane to lane, so the online forward rescales and merges sums at every scale."""
    s, t = logits(shape, torch.float32, 0, 1e3), logits(shape, torch.float32, 1, 1e3)
    ramp = torch.linspace(-1e3, 1e3, shape[1]).view(1, -1, 1)
    # |x| ~ 4e3: lse carries ~4e3 * 6e-8 of rounding, and exp(x / T - lse) that relative error
    check_softmax_kl(kernels, s + ramp, t * 0.01 + ramp, T, slack=50.0)


@pytest.mark.parametrize("shape", [(4, 20, 1), (4, 100, 1), (4, 600, 1), (4, 19, 64)])
def test_softmax_kl_tiny_between_distant_maxima(kernels, shape):
    """Student and teacher confident in the same class, their maxima 25 apart and more: each
    vector's KL is far below |ms - mt|. The one-read form once added ms - mt at the end, so such a
    KL came out as roundoff at its size (0 for a true 1.7e-12, fuzzer seed 20261210); held here
    vector by vector to the CPU's two-pass kernel, in every launch shape (warp rows, block rows,
    pixels)."""
    outer, K, inner = shape
    t = torch.randn(shape, generator=gen(5)) * 3
    top = torch.randint(0, K, (outer, 1, inner), generator=gen(6))
    t = t.scatter_add(1, top, torch.full((outer, 1, inner), 40.0))
    s = t * 1.5 + 25
    got, want = kernels.softmax_kl(s, t, 1.0)[0], CPU.softmax_kl(s, t, 1.0)[0]
    assert bool((want > 0).all()) and float(want.max()) < 1e-8
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)


def test_softmax_kl_pixel_grid_wraps(kernels):
    """More images than a grid's y dimension holds (65535): the pixel kernels' image loop
    wraps (the backward's class-group loop, over z, runs several steps in every case above). The
    images past the wrap have the largest KL and gradients (the student's mass on class 0, the
    teacher's on class 1), far above the tolerance: one left unwritten fails."""
    s, t = logits((65537, 2, 4), torch.float32, 0), logits((65537, 2, 4), torch.float32, 1)
    s[-2:, 0], s[-2:, 1], t[-2:, 0], t[-2:, 1] = 14.0, 0.0, 0.0, 14.0
    _, grad = check_softmax_kl(kernels, s, t, 1.0)
    assert grad[-2:].abs().min() > 0.4


def test_softmax_kl_teacher_half_student_float(kernels):
    """The teacher is cast to the student's dtype first."""
    s, t = logits((3, 64, 1), torch.float32, 0), logits((3, 64, 1), torch.float16, 1)
    check_softmax_kl(kernels, s, t, 2.0)


@pytest.mark.parametrize("shape", [(2, 19, 64), (2, 19, 30), (8, 100, 1), (2, 2048, 1)])
def test_softmax_kl_reduced_grad(kernels, shape):
    """The gradient of a reduced loss arrives expanded (strides 0); a "none" gradient may arrive
    transposed. The backward reads it in place with its strides."""
    s, t = logits(shape, torch.float32, 0), logits(shape, torch.float32, 1)
    outer, _, inner = shape
    check_softmax_kl(kernels, s, t, 4.0, torch.tensor(0.7).expand(outer, inner))
    check_softmax_kl(kernels, s, t, 4.0, torch.rand(inner, outer, generator=gen(5)).t())


@pytest.mark.parametrize("shape", [(3, 0, 1), (0, 5, 1), (2, 0, 4), (0, 3, 4)])
def test_softmax_kl_empty(kernels, shape):
    s, t = torch.randn(shape), torch.randn(shape)
    got, want = kernels.softmax_kl(s, t, 2.0), CPU.softmax_kl(s, t, 2.0)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    grad = torch.ones(shape[0], shape[2])
    assert kernels._softmax_kl_backward(grad, s, t, got[1], got[2], 2.0).shape == shape


def masked(shape, dtype, layout):
    """Student and teacher with the -inf patterns of METHOD.md ("-inf logits"), vector by vector:
    0 none; 1 some teacher entries (they add 0); 2 the teacher everywhere (KL 0, zero gradient);
    3 the student everywhere (+inf, zero gradient); 4 both everywhere (0); 5 some student
    entries where the teacher has mass (+inf, finite gradient); 6 student and teacher -inf at
    the same entries (they add 0); 7 the teacher's first half (whole warps and chunks of it
    empty, merged with the rest). For "rows" a vector is a row [o, :, 0]; for "pixels" the
    classes [0, :, i] of pixel i of the first image (the second has none)."""
    s, t = logits(shape, dtype, 0), logits(shape, dtype, 1)
    inf = float("-inf")

    def vec(x, n):
        return x[n, :, 0] if layout == "rows" else x[0, :, n]

    vec(t, 1)[::3] = inf
    vec(t, 2)[:] = inf
    vec(s, 3)[:] = inf
    vec(s, 4)[:] = inf
    vec(t, 4)[:] = inf
    vec(s, 5)[1::4] = inf
    vec(s, 6)[::2] = inf
    vec(t, 6)[::2] = inf
    vec(t, 7)[: shape[1] // 2] = inf
    return s, t


@pytest.mark.parametrize("shape,dtype", [((8, 100, 1), torch.float32), ((8, 2048, 1), torch.float32),
                                         ((8, 301, 1), torch.float32), ((8, 64, 1), torch.float16),
                                         ((8, 40, 1), torch.float64)], ids=str)
def test_softmax_kl_inf_rows(kernels, shape, dtype):
    s, t = masked(shape, dtype, "rows")
    (kl, lse_s, lse_t), grad = check_softmax_kl(kernels, s, t, 4.0)
    assert kl[2, 0] == 0 and kl[4, 0] == 0 and kl[3, 0] == float("inf") and kl[5, 0] == float("inf")
    assert torch.isfinite(kl[[0, 1, 6, 7]]).all()
    assert torch.isposinf(lse_s[[2, 3, 4]]).all() and torch.isposinf(lse_t[[2, 3, 4]]).all()
    assert (grad[[2, 3, 4]] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("shape,dtype", [((2, 19, 8), torch.float32), ((2, 19, 9), torch.float32),
                                         ((2, 9, 8), torch.float16), ((2, 9, 8), torch.float64)], ids=str)
def test_softmax_kl_inf_pixels(kernels, shape, dtype):
    s, t = masked(shape, dtype, "pixels")
    (kl, _, _), grad = check_softmax_kl(kernels, s, t, 1.0)
    assert kl[0, 2] == 0 and kl[0, 4] == 0 and kl[0, 3] == float("inf") and kl[0, 5] == float("inf")
    assert torch.isfinite(kl[0, [0, 1, 6, 7]]).all()
    assert (grad[0, :, [2, 3, 4]] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("shape,where", [((4, 40, 1), 3), ((4, 40, 1), 39), ((4, 301, 1), 300),
                                         ((3, 2052, 1), 2051), ((2, 9, 8), 8), ((2, 19, 7), 3)], ids=str)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_softmax_kl_nan_propagates(kernels, shape, where, side):
    """A NaN logit makes its vector's outputs NaN, as on the CPU: never a finite value that
    silently leaves it (and its neighbours) out. Placed mid-vector, or last and followed by
    -inf (the kernels' padding of a chunk, masked classes)."""
    s, t = logits(shape, torch.float32, 0), logits(shape, torch.float32, 1)
    x = s if side == "student" else t
    rows = shape[2] == 1
    vec = (lambda n: x[n, :, 0]) if rows else (lambda n: x[0, :, n])
    vec(1)[where] = float("nan")
    vec(2)[where] = float("nan")
    vec(2)[where + 1:] = float("-inf")
    got, want = kernels.softmax_kl(s, t, 2.0), CPU.softmax_kl(s, t, 2.0)
    picked = (lambda out: out[[1, 2], 0]) if rows else (lambda out: out[0, [1, 2]])
    assert torch.isnan(picked(want[0])).all()
    for g, w in zip(got, want):
        close(g, w, RTOL[torch.float32])


@pytest.mark.parametrize("shape,block", [((4, 40, 1), (0, 4)), ((4, 40, 1), (36, 40)), ((4, 41, 1), (37, 41)),
                                         ((3, 2052, 1), (2048, 2052)),
                                         ((3, 19, 8), (0, 8)), ((3, 19, 9), (0, 8)), ((3, 19, 9), (8, 16))], ids=str)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_kl_nan_alone_in_its_part(kernels, shape, block, side, dtype):
    """A NaN whose pack (a lane's share of a row: 16 bytes, or one value where the length is
    not a multiple of that) or chunk of classes holds only -inf besides: that part has no
    maximum of its own, and its NaN must still reach the sums. Vector 2 holds nothing but that
    NaN and -inf: NaN too, not the -inf rule's 0 or +inf (METHOD.md, "-inf logits")."""
    s, t = logits(shape, dtype, 0), logits(shape, dtype, 1)
    x = s if side == "student" else t
    x[1, block[0]:block[1], 0] = float("-inf")
    x[1, block[1] - 1, 0] = float("nan")
    x[2, :, 0] = float("-inf")
    x[2, block[1] - 1, 0] = float("nan")
    got, want = kernels.softmax_kl(s, t, 2.0), CPU.softmax_kl(s, t, 2.0)
    assert torch.isnan(want[0][1, 0]) and torch.isnan(want[0][2, 0])
    for g, w in zip(got, want):
        close(g, w, RTOL[dtype])


@pytest.mark.parametrize("shape", [(3, 40, 1), (2, 2050, 1), (2, 19, 9)], ids=str)
@pytest.mark.parametrize("gap", [90.0, 800.0])
def test_softmax_kl_student_minus_inf_under_a_tiny_teacher_probability(kernels, shape, gap):
    """A teacher entry gap * T below its maximum (probability a float32 subnormal at 90, 0 in
    every float at 800) over a student -inf: +inf as on the CPU and in the reference (METHOD.md,
    "-inf logits"), not the finite KL of a term taken as 0 from the rounded probability."""
    T = 2.0
    s, t = logits(shape, torch.float32, 0), logits(shape, torch.float32, 1)
    at = (1, 5, 0) if shape[2] == 1 else (0, 5, 3)  # entry 5 of row 1 / of pixel 3's classes
    vector = t[at[0], :, at[2]]
    t[at] = vector.max() - gap * T
    s[at] = float("-inf")
    (kl, _, _), _ = check_softmax_kl(kernels, s, t, T)
    assert kl[at[0], at[2]] == float("inf") and torch.isfinite(kl).sum() == kl.numel() - 1


@pytest.mark.parametrize("shape", [(1, 40, 1), (1, 600, 1), (1, 2050, 1), (1, 19, 9)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_kl_infinite_term_survives_a_rising_teacher_maximum(kernels, shape, dtype):
    """A finite teacher entry over a student -inf makes w (and the KL) +inf; a teacher maximum
    that rises by more than ~104 afterwards rescales the running sums by exp(-1000) = 0, which
    made the one-read kernels' w inf * 0 = NaN (softmax_kl_online.h, rescaled_w)."""
    s, t = logits(shape, dtype, 0), logits(shape, dtype, 1)
    s[0, 0, :] = float("-inf")  # the first class (pixel KD) / entry (CWD): read first
    t[0, -1, :] = 1000.0        # the last: read last, it raises the teacher's maximum by ~1000
    (kl, _, _), _ = check_softmax_kl(kernels, s, t, 1.0)
    assert torch.isposinf(kl).all()


@pytest.mark.parametrize("HW", [(4, 5), (8, 16), (32, 64)])
def test_cwd_teacher_channel_masked_everywhere(kernels, HW):
    """Issue 22 item 5: CWD with a teacher channel -inf at every pixel agrees with
    idd_ops.reference (the channel contributes 0 and counts in the B*C divisor), value and
    gradient, through the op's CWD use (idd_ops.baselines.channel_wise_distillation_loss)."""
    B, C, (H, W), T = 2, 3, HW, 4.0
    s, t = logits((B, C, H, W), torch.float32, 0), logits((B, C, H, W), torch.float32, 1)
    t[1, 2] = float("-inf")
    kl, lse_s, lse_t = kernels.softmax_kl(s.reshape(B * C, H * W, 1), t.reshape(B * C, H * W, 1), T)
    loss = kl.sum() * T ** 2 / (B * C)
    s64 = s.to(torch.float64, copy=True).requires_grad_()
    want = reference.channel_wise_distillation_loss(s64, t.double(), temperature=T)
    want.backward()
    assert torch.isfinite(loss) and kl.view(B, C)[1, 2] == 0
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    close(kl, CPU.softmax_kl(s.reshape(B * C, H * W, 1), t.reshape(B * C, H * W, 1), T)[0], RTOL[torch.float32])
    grad = torch.full((B * C, 1), T ** 2 / (B * C))
    dgot = kernels._softmax_kl_backward(grad, s.reshape(B * C, H * W, 1), t.reshape(B * C, H * W, 1), lse_s, lse_t, T)
    torch.testing.assert_close(dgot.view(B, C, H, W).double(), s64.grad, rtol=1e-5, atol=1e-7)
    assert (dgot.view(B, C, H, W)[1, 2] == 0).all()
