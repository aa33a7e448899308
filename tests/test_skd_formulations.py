"""SKD's two formulations (csrc/composite/affinity_loss.h): the blocked one the CPU takes and the
batched one CUDA takes. The private variable _IDD_OPS_SKD_BATCHED=1
forces the batched one on any device, so the CPU runs the SKD tests of test_baselines and
test_api on the GPU's formulation here."""
import contextlib

import pytest
import torch

import idd_ops
import test_api
import test_baselines
from idd_ops import reference
from conftest import gradcheck
from test_precision import tf32_matmuls

FORCE = "_IDD_OPS_SKD_BATCHED"
SKD = ["structural_kd_loss", "structural_kd_loss_pool1"]


@pytest.fixture
def batched(monkeypatch):
    monkeypatch.setenv(FORCE, "1")


@pytest.fixture(params=["blocked", "batched"])
def formulation(request, monkeypatch):
    if request.param == "batched":
        monkeypatch.setenv(FORCE, "1")
    else:
        monkeypatch.delenv(FORCE, raising=False)
    return request.param


# ---- the SKD tests of the other files, on the batched formulation ----------------------


@pytest.mark.parametrize("name", SKD)
@pytest.mark.parametrize("size", [(7, 9), (16, 33), (1, 1)])
def test_matches_reference(batched, device, name, size):
    test_baselines.test_matches_reference(device, name, size)


@pytest.mark.parametrize("name", SKD)
def test_gradcheck(batched, device, name):
    test_baselines.test_gradcheck(device, name)


@pytest.mark.parametrize("name", SKD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_forward(batched, device, name, dtype, layout):
    test_baselines.test_low_precision_forward(device, name, dtype, layout)


@pytest.mark.parametrize("extra_channels,pool", [(0, 1), (3, 1), (0, 4), (3, 4)])
@pytest.mark.parametrize("student_scale", [1.0, 1e-4, 1e4])
def test_value_accurate_in_float32_near_zero(batched, device, extra_channels, pool, student_scale):
    test_api.test_skd_value_accurate_in_float32_near_zero(device, extra_channels, pool, student_scale)


def offset_features(offset, difference, seed=0, shape=(2, 128, 32, 32)):
    """float64 features whose channels share offsets of `offset` times their unit spread (the
    teacher's and the student's own: their mean directions differ), the student `difference`
    from the teacher besides; with offset 0 the student is the teacher plus `difference`."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    teacher = base + offset * (1 + torch.rand(1, shape[1], 1, 1, generator=g, dtype=torch.float64))
    student = base + offset * (1 + torch.rand(1, shape[1], 1, 1, generator=g, dtype=torch.float64)) \
        + difference * torch.randn(shape, generator=g, dtype=torch.float64)
    if offset == 0:
        student = teacher + difference * torch.randn(shape, generator=g, dtype=torch.float64)
    return student.float().double(), teacher.float().double()  # what float32 holds: the same inputs


OFFSETS = [(0.0, 1e-2), (1.0, 0.3), (3.0, 0.3), (10.0, 0.3), (100.0, 0.3), (1000.0, 0.3)]
OFFSET_IDS = ["near-teacher", "offset-1", "offset-3", "offset-10", "offset-100", "offset-1000"]


def float32_errors(device, offset, difference, context=contextlib.nullcontext):
    """Relative error of the float32 SKD value and max-norm error of its gradient against the
    float64 reference, on offset_features, with the op run inside `context(device)`."""
    student, teacher = offset_features(offset, difference)
    want = student.clone().requires_grad_()
    want_value = reference.structural_kd_loss(want, teacher)
    want_value.backward()
    got = student.float().to(device).requires_grad_()
    with context(device):
        value = idd_ops.structural_kd_loss(got, teacher.float().to(device))
        value.backward()
    error = float((got.grad.double().cpu() - want.grad).abs().max() / want.grad.abs().max())
    return abs(float(value) / float(want_value) - 1), error


@pytest.mark.parametrize("offset,difference", OFFSETS, ids=OFFSET_IDS)
def test_float32_accuracy_with_a_common_offset(formulation, device, offset, difference):
    """METHOD.md 8's contract for SKD in float32, against float64: the value within 1e-6
    relative and the gradient (max-norm) within 5e-5, for a student near its teacher and for
    features sharing a common offset up to 1000 times their spread. Measured on both
    formulations: value 6e-9 to 8e-8, gradient 1e-7 to 9e-7 up to an offset of 100, 9.5e-6 at
    1000. Without the pivot (affinity_pivot: Grams of the uncentred features) the offset of 10
    cost 8.8e-3 / 9.6e-4 and 100 the whole value; the float32 reference, which forms the P x P
    affinities, is 2.9e-5 / 1.1e-3 off at 10."""
    value_error, grad_error = float32_errors(device, offset, difference)
    assert value_error < 1e-6
    assert grad_error < 5e-5, grad_error


@pytest.mark.parametrize("offset,difference", [(0.0, 1e-2), (10.0, 0.3)], ids=["near-teacher", "offset-10"])
def test_float32_accuracy_under_tf32(formulation, device, offset, difference):
    """With TF32 on (emulated on the CPU), SKD's Grams, which follow the flags (METHOD.md 8),
    round their operands to 10 bits of the centred features' size, not of the offset's: value
    within 1e-5 and gradient within 5e-4 of float64 (measured 2e-6 / 2e-5 near the teacher and
    5e-7 / 6e-5 at an offset of 10 times the spread, both formulations; uncentred, that offset
    cost 5e-3 / 0.36)."""
    value_error, grad_error = float32_errors(device, offset, difference, tf32_matmuls)
    assert value_error < 1e-5
    assert grad_error < 5e-4, grad_error


@pytest.mark.parametrize("pool", [2, 3])
def test_pooling_ties_route_the_gradient_as_max_pool2d(batched, device, pool):
    test_baselines.test_skd_pooling_ties_route_the_gradient_as_max_pool2d(device, pool)


def test_opcheck(batched, device):
    test_baselines.test_opcheck(device)


def test_never_forms_the_pixel_affinity(batched):
    test_baselines.test_skd_never_forms_the_pixel_affinity()


# ---- cases both formulations must meet ---------------------------------------------------


@pytest.mark.parametrize("teacher_channels", [2, 4, 7])
@pytest.mark.parametrize("pool", [1, 2, 3])
def test_gradcheck_channel_counts(formulation, device, teacher_channels, pool):
    """Narrower, equal and wider teachers; batches larger than one chunk (pool * pool images)."""
    g = torch.Generator().manual_seed(pool)
    s = torch.randn(pool * pool + 1, 4, 4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randn(pool * pool + 1, teacher_channels, 4, 5, generator=g, dtype=torch.float64).to(device)
    got = idd_ops.structural_kd_loss(s, t, pool=pool, reduction="none")
    torch.testing.assert_close(got, reference.structural_kd_loss(s, t, pool=pool, reduction="none"),
                               rtol=1e-9, atol=1e-12)
    assert gradcheck(lambda x: idd_ops.structural_kd_loss(x, t, pool=pool), (s,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_backward_with_odd_sizes(formulation, device, dtype):
    """Half and bfloat16 forward and backward with an odd number of pooled pixels (5 x 7) and
    unequal channel counts: on CUDA the batched formulation keeps such operands in their dtype
    for its GEMMs (cuBLAS takes an odd leading dimension on another path than an even one), and
    the backward reads a strided slice of a Gram. Within the dtype's tolerance of float64 on the
    same values."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 6, 10, 14, generator=g).to(dtype=dtype, device=device).requires_grad_()
    t = torch.randn(2, 10, 10, 14, generator=g).to(dtype=dtype, device=device)
    weight = torch.tensor([1.0, 0.5], dtype=torch.float64, device=device)
    got = idd_ops.structural_kd_loss(s, t, pool=2, reduction="none")
    (got.double() * weight).sum().backward()
    s64 = s.detach().double().requires_grad_()
    want = reference.structural_kd_loss(s64, t.double(), pool=2, reduction="none")
    (want * weight).sum().backward()
    assert got.dtype == s.grad.dtype == dtype
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=2e-2 * float(s64.grad.abs().max()))


@pytest.mark.parametrize("scale", [0.0, 1e-14])
@pytest.mark.parametrize("zero", ["student", "teacher", "both"])
def test_zero_feature_pixels(formulation, device, zero, scale):
    """Pixels whose features have a norm under F.normalize's floor, all zero or tiny but nonzero
    (where the floored terms of the gradient and the difference do not multiply zeros): value
    and gradient as the reference's x / max(|x|, eps)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 6, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 6, 6, generator=g, dtype=torch.float64)
    for x in {"student": (s,), "teacher": (t,), "both": (s, t)}[zero]:
        x[:, :, :2, :4] *= scale  # whole pooling windows at pool 2
    s = s.to(device).requires_grad_()
    t = t.to(device)
    got = idd_ops.structural_kd_loss(s, t, pool=2)
    want = reference.structural_kd_loss(s, t, pool=2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-9, atol=1e-12)


def _aten_calls(s, t, pool):
    """ATen operators called by one forward and backward (each a kernel launch or more on CUDA)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        idd_ops.structural_kd_loss(s, t, pool=pool).backward()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_the_variable_selects_the_formulation(monkeypatch):
    s = torch.randn(2, 8, 16, 16, requires_grad=True)
    t = torch.randn(2, 8, 16, 16)
    monkeypatch.delenv(FORCE, raising=False)
    blocked = _aten_calls(s, t, 2)
    monkeypatch.setenv(FORCE, "1")
    batched = _aten_calls(s, t, 2)
    assert "aten::bmm" in batched and "aten::bmm" not in blocked


def test_batched_launches_do_not_grow_with_the_image(batched):
    """The batched formulation's ATen calls depend on the number of chunks, not on H x W (the
    blocked one's per-block loops grow with it): a guard against per-block work coming back."""
    counts = []
    for H, W in [(32, 64), (128, 256)]:
        s = torch.randn(8, 4, H, W, requires_grad=True)
        counts.append(len(_aten_calls(s, torch.randn(8, 4, H, W), 2)))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("B, teacher_channels", [(5, 6), (2, 3)], ids=["chunks_narrow_student", "narrow_teacher"])
def test_batched_writes_every_output(batched, poisoned_empties, pool, B, teacher_channels):
    """The batched formulation leaves its Grams, per-image sums and (pool 1) gradient
    uninitialised for the chunks to write: with the deterministic mode's NaN-filled empties, a
    row no chunk writes (5 images: a chunk of 4 at pool 2, then one of 1) would show."""
    s = torch.randn(B, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, teacher_channels, 6, 7, dtype=torch.float64)
    per_image, gss, gst = torch.ops.idd_ops.affinity_loss(s, t, pool)
    assert torch.isfinite(per_image).all() and torch.isfinite(gss).all() and torch.isfinite(gst).all()
    loss = idd_ops.structural_kd_loss(s, t, pool=pool, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), s)
    want = reference.structural_kd_loss(s, t, pool=pool, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_a_one_channel_student(formulation, device, dtype, offset):
    """A student of one channel is +-1 at every pixel after normalisation: its gradient is 0 to
    the last bit, however large the centred form's terms before the projection (with a teacher
    offset of 100 too). The projection takes S as normalised: with x + m_S, which is not +-1 to
    the last bit, float64 kept 2e-12 (found by the fuzzer, seed 20261252)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 1, 7, 10, generator=g, dtype=dtype).to(device).requires_grad_()
    t = (torch.randn(3, 16, 7, 10, generator=g, dtype=dtype) + offset).to(device)
    (grad,) = torch.autograd.grad(idd_ops.structural_kd_loss(s, t, pool=1, reduction="sum"), s)
    assert torch.equal(grad, torch.zeros_like(grad))
