"""SKD's fused CUDA kernels (csrc/cuda/affinity_loss_cuda.cu) on the CUDA emulator: forward
(per-image loss, G_xx, G_xd kept for the backward) and backward against the CPU op (the blocked
formulation, which the rest of the suite holds to the float64 reference).

Cases reach every branch of the ten kernels (eight in the default set, six in the next): pooled
pixels not a multiple of the block's 8 and ceil-mode windows cut by the border (whole 2 x 2 windows
and the general loop); student narrower, equal and wider than the teacher, with channel counts past
one 32 x 32 tile of the Gram tail (its mirror tile of G_sd, tiles outside G_ss, the kept G_sd's
columns beyond Cs); batches of several chunks; pool 1; features whose norm is floored (zero, and
tiny but nonzero); ties and NaN inside a window (the argmax is max_pool2d's); half, bfloat16 and
strided inputs; float32 accuracy as the student nears the teacher and with a common offset; and
every output written with no fill.
"""
import pytest
import torch

import idd_ops  # noqa: F401
from idd_ops import reference
from test_cuda_emulated import CPU, close, emu, randn  # noqa: F401  (fixtures)
from test_skd_formulations import offset_features

SHAPES = {  # B, Cs, Ct, H, W, pool
    "narrow_student": (2, 40, 70, 9, 13, 2),
    "narrow_teacher": (5, 70, 36, 7, 11, 2),  # a chunk of 4 images, then one of 1
    "equal_pool3": (2, 33, 33, 10, 17, 3),
    "pool1": (3, 12, 20, 5, 14, 1),
}


@pytest.fixture(params=[False, True], ids=["default", "next"])
def fused(emu, request):
    """Both kernel sets: the next one (IDD_OPS_CUDA_NEXT) interleaves x and d in one operand, takes
    G_xd and G_dd from one GEMM and the backward's G_xd x + G_xy d from one, forms the operands
    and u in one launch and each image's mean in the Gram tail's last block."""
    emu._emu_configure(request.param, 3)
    yield emu
    emu._emu_configure(False, 3)


def inputs(B, Cs, Ct, H, W, dtype=torch.float64, seed=0):
    return randn(B, Cs, H, W, seed=seed, dtype=dtype), randn(B, Ct, H, W, seed=seed + 1, dtype=dtype)


def check(ops, s, t, pool, rtol, grad=None):
    got, want = ops.affinity_loss(s, t, pool), CPU.affinity_loss(s, t, pool)
    close(got, want, rtol=rtol, atol=rtol)
    if grad is None:
        grad = torch.rand(s.shape[0], dtype=want[0].dtype, generator=torch.Generator().manual_seed(5)) + 0.5
    args = (s, t, want[1], want[2], pool)
    close(ops._affinity_loss_backward(grad, *args), CPU._affinity_loss_backward(grad, *args), rtol=rtol, atol=rtol)


def check_sum(ops, s, t, pool, mean, rtol):
    """_affinity_loss_sum (SKD reduced in the op; next: the total added by the Gram tail's last
    block) and its backward against the CPU op's."""
    got, want = ops._affinity_loss_sum(s, t, pool, mean), CPU._affinity_loss_sum(s, t, pool, mean)
    close(got, want, rtol=rtol, atol=rtol)
    grad = torch.tensor(0.75, dtype=want[0].dtype)
    args = (grad, s, t, want[1], want[2], pool, mean)
    close(ops._affinity_loss_sum_backward(*args), CPU._affinity_loss_sum_backward(*args), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_the_cpu_op(fused, shape):
    B, Cs, Ct, H, W, pool = shape
    s, t = inputs(B, Cs, Ct, H, W)
    check(fused, s, t, pool, 1e-9)


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("B", [1, 5, 9])  # chunks of 4 at pool 2: 1; 4 + 1; 4 + 4 + 1
def test_the_sum_matches_the_cpu_op(fused, B, mean):
    s, t = inputs(B, 40, 70, 9, 13)
    check_sum(fused, s, t, 2, mean, 1e-9)
    s, t = inputs(B, 12, 20, 6, 8, dtype=torch.bfloat16)
    check_sum(fused, s, t, 2, mean, 1e-2)


@pytest.mark.parametrize("case", ["mixed_dtypes", "no_pixels"])
def test_inputs_the_fused_kernels_do_not_take(fused, case):
    """A student and teacher of different dtypes, and maps without pixels, take the batched ATen
    formulation forward and backward, reduced or not (no launch of the library's own kernels): the
    CPU op's values."""
    shape = (2, 6, 5, 7) if case == "mixed_dtypes" else (2, 6, 0, 7)
    s = randn(*shape, dtype=torch.float32 if case == "mixed_dtypes" else torch.float64)
    t = randn(shape[0], 9, *shape[2:], seed=1, dtype=torch.float64)
    before = fused._emu_launches()
    check(fused, s, t, 2, 1e-5)
    check_sum(fused, s, t, 2, True, 1e-5)
    assert fused._emu_launches() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(fused, dtype):
    s, t = inputs(2, 40, 70, 9, 13, dtype=dtype)
    check(fused, s, t, 2, {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype])


def test_strided_inputs(fused):
    """channels_last, a column stride of 2 and batch strides that are not the image size, over
    two chunks (the chunk offsets go by the batch stride)."""
    s, t = inputs(10, 12, 20, 6, 8)
    s = s[::2].contiguous(memory_format=torch.channels_last)
    t = torch.cat([t, t], 3)[:5, :, :, ::2]
    check(fused, s, t, 2, 1e-9)


def test_an_expanded_gradient(fused):
    """The loss's gradient as a mean's backward hands it on: one value, stride 0, over two chunks."""
    s, t = inputs(5, 12, 20, 6, 8)
    check(fused, s, t, 2, 1e-9, grad=torch.tensor(0.25, dtype=torch.float64).expand(5))


@pytest.mark.parametrize("scale", [0.0, 1e-14])
def test_floored_norms(fused, scale):
    """Whole windows whose features have a norm under F.normalize's floor, in either network:
    zero (where the floored terms multiply zeros) and tiny but nonzero (where they do not)."""
    s, t = inputs(2, 10, 14, 6, 6)
    s[0, :, :2, :4] *= scale
    t[1, :, 2:4, :] *= scale
    s[1, :, 4:, 4:] *= scale
    t[1, :, 4:, 4:] *= scale
    check(fused, s, t, 2, 1e-9)


@pytest.mark.parametrize("extra_channels", [0, 8])
@pytest.mark.parametrize("student_scale", [1.0, 1e-4, 1e4])
def test_value_accurate_in_float32_near_zero(fused, extra_channels, student_scale):
    """The differenced form keeps its relative accuracy in float32 as the student nears the
    teacher (test_api's case, here on the kernels): 1e-6 of the float64 value, where the plain
    difference of normalised features gives about 1e-4; also with the student at another scale,
    where D is formed from float64 norms (test_api's bound; D divided by the student's norm was
    0.1 off at 1e-4)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 32, 16, 16, generator=g, dtype=torch.float64)
    s = student_scale * (t + 1e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    t = torch.cat([t, t.new_zeros(2, extra_channels, 16, 16)], 1)
    want = reference.structural_kd_loss(s, t, pool=2, reduction="none")
    got = fused.affinity_loss(s.float(), t.float(), 2)[0].double()
    assert (got / want - 1).abs().max() < (1e-5 if student_scale == 1 else 1e-4)


@pytest.mark.parametrize("dtype, step", [(torch.float32, 1e-3), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("student_scale", [1.0, 1e-3])
def test_gradient_accurate_near_zero(fused, dtype, step, student_scale):
    """The gradient shrinks with the loss as the student nears the teacher. Taken as
    G_sd U_S + G_st D (both terms shrink too) from the kept G_sd, its error stays relative to
    it: within 2e-6 of the float64 op on the same inputs in float32 (2e-7 measured), where
    G_ss U_S - G_st U_T loses about 1e-3, and so did G_sd formed again from a kept G_st (the
    bound was 1e-4 and 2e-3 at a student scale of 1e-3); within 2e-2 for half and bfloat16
    inputs (bfloat16's GEMM operands keep its dtype; `step`: a difference the dtype resolves)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 32, 16, 16, generator=g, dtype=torch.float64)
    s = (student_scale * (t + step * torch.randn(t.shape, generator=g, dtype=torch.float64))).to(dtype)
    t = t.to(dtype)
    grad = torch.tensor([1.0, 0.5], dtype=torch.float64)
    s64, t64 = s.double(), t.double()
    _, gss, gst = CPU.affinity_loss(s64, t64, 2)
    want = CPU._affinity_loss_backward(grad, s64, t64, gss, gst, 2)
    _, gss, gst = fused.affinity_loss(s, t, 2)
    got = fused._affinity_loss_backward(grad.float(), s, t, gss, gst, 2).double()
    error = ((got - want).abs().max() / want.abs().max()).item()
    # a student at 1e-3 of the teacher's scale: S - T is not small (6e-2 when D was divided by the
    # student's norm, 4e-4 with float32 norms)
    assert error < (2e-6 if dtype == torch.float32 else 2e-2), error


def test_ties_and_nan_route_as_max_pool2d(fused):
    g = torch.Generator().manual_seed(2)
    s = torch.randint(0, 3, (2, 6, 7, 9), generator=g).double()  # many ties in each 3 x 3 window
    t = torch.randint(0, 3, (2, 5, 7, 9), generator=g).double()
    check(fused, s, t, 3, 1e-9)
    s[0, 1, 1, 1] = float("nan")
    s[0, 1, 2, 2] = float("nan")
    grad = torch.ones(2, dtype=torch.float64)
    per_image, gss, gst = CPU.affinity_loss(s, t, 3)
    got = fused._affinity_loss_backward(grad, s, t, gss, gst, 3)
    want = CPU._affinity_loss_backward(grad, s, t, gss, gst, 3)
    assert torch.equal(got.isnan(), want.isnan())  # image 0: NaN where ATen's argmax routes it
    close(got[1], want[1], rtol=1e-9, atol=1e-9)
    assert torch.equal(fused.affinity_loss(s, t, 3)[0].isnan(), per_image.isnan())


@pytest.mark.parametrize("shape", [SHAPES["narrow_teacher"], SHAPES["pool1"]], ids=["chunks", "pool1"])
def test_writes_every_output(fused, poisoned_empties, shape):
    """Outputs and temporaries come from at::empty, NaN-filled here: an element no kernel
    writes would show."""
    B, Cs, Ct, H, W, pool = shape
    s, t = inputs(B, Cs, Ct, H, W)
    check(fused, s, t, pool, 1e-9)
    check_sum(fused, s, t, pool, True, 1e-9)


@pytest.mark.parametrize("next_kernels", [False, True], ids=["default", "next"])
def test_same_bits_on_every_run(emu, next_kernels):
    """Fixed-order reductions: other block and thread orders give the same bits (in the next set,
    whichever tile block of an image finishes last adds its mean)."""
    s, t = inputs(5, 40, 70, 9, 13, dtype=torch.float32)
    runs = []
    try:
        for seed in (1, 2):
            emu._emu_configure(next_kernels, seed)
            loss, gss, gst = emu.affinity_loss(s, t, 2)
            total = emu._affinity_loss_sum(s, t, 2, True)[0]  # next: the last image to finish adds
            runs.append((loss, gss, gst, emu._affinity_loss_backward(torch.ones(5), s, t, gss, gst, 2), total))
    finally:
        emu._emu_configure(False, 3)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


NEXT_SHAPES = {  # B, Cs, Ct, H, W, pool
    "blocks_36": (2, 12, 20, 24, 48, 2),     # the pivot's 36 blocks: two groups of 16 and a rest
    "blocks_66": (3, 9, 5, 17, 31, 1),       # 66 blocks; pool 1: no quads
    "wide_channels": (2, 70, 150, 9, 13, 2),  # channel steps of 64 and 128 cut short; border windows
    "student_wider": (5, 131, 40, 6, 10, 2),  # the teacher's channels end inside a step
    "pool3": (2, 33, 33, 10, 17, 3),          # no quads: the general windows
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", NEXT_SHAPES.values(), ids=NEXT_SHAPES.keys())
def test_next_kernels_match_the_default(emu, shape, dtype):
    """IDD_OPS_CUDA_NEXT's loads ahead (the pivot kernel's 16 block sums, the pooling kernel's two
    channels of whole 2 x 2 windows, the centring kernel's four channels and the gradient
    kernel's three channels of whole windows, each added in the default's order) over whole
    steps and the rest, with its GEMMs over the interleaved operand: the default set's values,
    forward and backward, to the rounding of GEMMs of other shapes (a BLAS may add a product's
    terms in another order for another shape; one GEMM adds G_xd x and G_xy d where two GEMMs'
    results were added; even G_xx, whose GEMM has one shape in both, as a CPU GEMM may round a
    strided view of x otherwise than a tensor of its own). So the loads ahead's order of adds is
    no longer held to the bit here: no output of the next set isolates those kernels from its
    GEMMs. NaN in windows of image 0 (the others stay finite): the pooled values'
    comparisons and argmax keep max_pool2d's. A zero window of the student in image 1: a pixel
    whose norm is floored (the backward's other branch). bfloat16: the GEMM operands kept in it,
    whose float32 sums cancel to about 1e-4 of the gradient's largest element."""
    B, Cs, Ct, H, W, pool = shape
    s, t = inputs(B, Cs, Ct, H, W, dtype=dtype)
    s[0, 1, 1, 1] = float("nan")
    t[0, 2, 2, 3] = float("nan")
    s[1, :, :pool, :pool] = 0
    grad = torch.rand(B, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                      generator=torch.Generator().manual_seed(5)) + 0.5
    runs = []
    try:
        for next_kernels in (False, True):
            emu._emu_configure(next_kernels, 3)
            loss, gss, gst = emu.affinity_loss(s, t, pool)
            runs.append((loss, gss, gst, emu._affinity_loss_backward(grad, s, t, gss, gst, pool)))
    finally:
        emu._emu_configure(False, 3)
    rtol = 1e-13 if dtype == torch.float64 else 5e-4
    for a, b in zip(*runs):
        assert torch.equal(a.isnan(), b.isnan()) and a[0].isnan().any()
        assert (a[1:] - b[1:]).abs().max() <= rtol * a[1:].abs().max()


@pytest.mark.parametrize("next_kernels", [False, True], ids=["default", "next"])
def test_launches(emu, next_kernels):
    """Forward: the pooling, pivot and centring kernels and a Gram tail per chunk, and one means
    launch (next: the tail's last blocks); backward: the GEMM operands, the pooling, pivot and
    centring kernels, u and a gradient kernel per chunk (next: the operands with u). The GEMMs
    are ATen's: 3 a chunk forward and 2 backward, 2 and 1 in the next set."""
    s, t = inputs(5, 12, 20, 6, 8)
    try:
        emu._emu_configure(next_kernels, 3)
        emu._emu_launch_log()
        _, gss, gst = emu.affinity_loss(s, t, 2)
        forward = len(emu._emu_launch_log()) // 3
        emu._affinity_loss_backward(torch.ones(5, dtype=torch.float64), s, t, gss, gst, 2)
        backward = len(emu._emu_launch_log()) // 3
    finally:
        emu._emu_configure(False, 3)
    assert (forward, backward) == ((2 * 4, 2 * 5) if next_kernels else (2 * 4 + 1, 2 * 6))
    # _affinity_loss_sum: the same launches (next: the total in the last chunk's tail; the default
    # set's ATen sum is no kernel of the library's)
    try:
        emu._emu_configure(next_kernels, 3)
        emu._emu_launch_log()
        emu._affinity_loss_sum(s, t, 2, True)
        forward_sum = len(emu._emu_launch_log()) // 3
        emu._affinity_loss_sum_backward(torch.ones((), dtype=torch.float64), s, t, gss, gst, 2, True)
        backward_sum = len(emu._emu_launch_log()) // 3
    finally:
        emu._emu_configure(False, 3)
    assert (forward_sum, backward_sum) == (forward, backward)


@pytest.mark.parametrize("offset", [10.0, 1000.0])
def test_float32_accuracy_with_a_common_offset(fused, offset):
    """The kernels centre S and D on the pixels' means before rounding them (centred_kernel), so
    a common offset does not round the Grams: METHOD.md 8's contract (test_skd_formulations),
    value within 1e-6 and gradient within 5e-5 of the float64 op on the same inputs."""
    s64, t64 = offset_features(offset, 0.3, shape=(2, 40, 9, 13))
    grad = torch.tensor([1.0, 0.5], dtype=torch.float64)
    want, gss, gsd = CPU.affinity_loss(s64, t64, 2)
    want_grad = CPU._affinity_loss_backward(grad, s64, t64, gss, gsd, 2)
    s, t = s64.float(), t64.float()
    got, gss, gsd = fused.affinity_loss(s, t, 2)
    got_grad = fused._affinity_loss_backward(grad.float(), s, t, gss, gsd, 2).double()
    assert (got.double() / want - 1).abs().max() < 1e-6
    error = ((got_grad - want_grad).abs().max() / want_grad.abs().max()).item()
    assert error < 5e-5, error


def test_a_one_channel_student(fused):
    """A student of one channel: its normalised feature is +-1 at every pixel, so its gradient is
    0. The kernel projects with S read again from the input: x + m_S rounded in float32 is not
    +-1 to the last bit, and left about 1e-7 of the large w (found by the fuzzer, teacher offset
    100)."""
    s, t = inputs(3, 1, 5, 10, 8, dtype=torch.float32)
    t = t + 100
    _, gss, gsd = fused.affinity_loss(s, t, 2)
    grad = fused._affinity_loss_backward(torch.ones(3), s, t, gss, gsd, 2)
    assert torch.equal(grad, torch.zeros_like(grad))
