"""_pixel_kd_sum, pixel KD reduced in one op (T^2 times the KL of the kept pixels summed in float64,
divided by their number for "mean"), and its backward: the reference's value and gradient, its
gradcheck, the pixels left out (a NaN there as the unfused route gives it), its fake kernel, and
pixel_kd_loss through it (the CUDA kernels: test_cuda_emulated_pixel_kd_sum.py)."""
from unittest import mock

import pytest
import torch

import idd_ops
from conftest import assert_devices_agree
from idd_ops import _switches, reference

ops = torch.ops.idd_ops


def logits_and_labels(B=2, K=5, H=3, W=4, dtype=torch.float64, seed=0, ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, K, H, W, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randn(B, K, H, W, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, K, (B, 2 * H, 2 * W), generator=g)  # resized by nearest neighbour
    y[torch.rand(y.shape, generator=g) < ignored] = 255
    return s, t, y


def fused(s, t, y, temperature, mean):
    B, K, H, W = s.shape
    slots = None if y is None else ops._label_slots(y, H, W, K, 255).view(B, H * W)
    return ops._pixel_kd_sum(s.reshape(B, K, H * W), t.reshape(B, K, H * W), slots, temperature, mean)


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_the_reference(with_labels, mean, temperature):
    s, t, y = logits_and_labels()
    y = y if with_labels else None
    x = s.clone().requires_grad_()
    loss, lse_s, lse_t, factor = fused(x, t, y, temperature, mean)
    want = reference.pixel_kd_loss(s.clone().requires_grad_(), t, y, temperature, reduction="mean" if mean else "sum")
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    (got_grad,) = torch.autograd.grad(loss, x)
    ref_x = s.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(
        reference.pixel_kd_loss(ref_x, t, y, temperature, reduction="mean" if mean else "sum"), ref_x)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    kept = torch.ones(2, 12, dtype=torch.bool) if y is None else ops._label_slots(y, 3, 4, 5, 255).view(2, 12) >= 0
    assert factor.dtype == torch.float64 and factor.dim() == 0
    assert float(factor) == temperature ** 2 / (int(kept.sum()) if mean else 1)
    _, want_lse_s, want_lse_t = ops.softmax_kl(s.reshape(2, 5, 12), t.reshape(2, 5, 12), temperature)
    assert torch.equal(lse_s, want_lse_s) and torch.equal(lse_t, want_lse_t)  # every pixel's


def test_gradcheck():
    s, t, y = logits_and_labels(B=1, K=3, H=2, W=3)
    x = s.reshape(1, 3, 6).clone().requires_grad_()
    slots = ops._label_slots(y, 2, 3, 3, 255).view(1, 6)
    assert torch.autograd.gradcheck(lambda x: ops._pixel_kd_sum(x, t.reshape(1, 3, 6), slots, 2.0, True)[0], (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_loss_in_the_accumulation_dtype(dtype):
    s, t, y = logits_and_labels(dtype=dtype)
    loss = fused(s, t, y, 1.0, True)[0]
    assert loss.dtype == torch.float32
    want = reference.pixel_kd_loss(s.double(), t.double(), y)
    torch.testing.assert_close(loss.double(), want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)


def test_a_nan_left_out_as_the_unfused_route():
    """A NaN logit at an ignored pixel: the loss stays finite; the gradient there is the unfused
    route's (0 * NaN: NaN, as torch.where's backward and the reference give it), every other
    pixel's the same."""
    s, t, y = logits_and_labels(B=1, ignored=0.0)
    y[0, :2, :2] = 255  # feature pixel (0, 0) ignored
    s[0, 1, 0, 0] = float("nan")
    x, z = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = fused(x, t, y, 1.0, True)[0]
    assert torch.isfinite(loss)
    loss.backward()
    with mock.patch.object(_switches, "pixel_kd_sum_path", lambda device: False):
        idd_ops.pixel_kd_loss(z, t, y).backward()
    assert torch.equal(x.grad.isnan(), z.grad.isnan()) and x.grad.isnan().any()
    torch.testing.assert_close(x.grad.nan_to_num(), z.grad.nan_to_num(), rtol=1e-12, atol=1e-15)


def test_nothing_kept_and_nothing_to_keep():
    s, t, y = logits_and_labels()
    x = s.clone().requires_grad_()
    loss, _, _, factor = fused(x, t, torch.full_like(y, 255), 2.0, True)
    loss.backward()
    assert float(loss.detach()) == 0 and float(factor) == 4.0 and torch.equal(x.grad, torch.zeros_like(s))
    empty = torch.zeros(2, 5, 0, dtype=torch.float64, requires_grad=True)
    loss, lse_s, _, factor = ops._pixel_kd_sum(empty, empty.detach(), None, 1.0, True)
    assert float(loss.detach()) == 0 and lse_s.shape == (2, 0) and float(factor) == 1.0
    no_classes = torch.zeros(2, 0, 6, dtype=torch.float64)
    loss, lse_s, _, _ = ops._pixel_kd_sum(no_classes, no_classes, None, 1.0, False)
    assert float(loss) == 0 and torch.equal(lse_s, torch.zeros(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_pixel_kd_loss_through_it(reduction, with_labels):
    """pixel_kd_loss takes the op where _switches.pixel_kd_sum_path says so (CUDA under
    IDD_OPS_CUDA_NEXT=1; forced here): the unfused route's value and gradient; "none" keeps that
    route."""
    s, t, y = logits_and_labels(dtype=torch.float32)
    y = y if with_labels else None
    x, z = s.clone().requires_grad_(), s.clone().requires_grad_()
    with mock.patch.object(_switches, "pixel_kd_sum_path", lambda device: True), \
            mock.patch.object(ops, "softmax_kl", side_effect=AssertionError("took the unfused route")):
        got = idd_ops.pixel_kd_loss(x, t, y, temperature=2.0, reduction=reduction)
    want = idd_ops.pixel_kd_loss(z, t, y, temperature=2.0, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, z.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cwd_through_it(reduction, dtype):
    """channel_wise_distillation_loss takes the op over its [B*C, H*W, 1] rows where
    _switches.pixel_kd_sum_path says so (forced here), with every row kept: the unfused route's
    value and gradient, and the reference's; "none" keeps that route."""
    s, t, _ = logits_and_labels(B=2, K=6, H=5, W=7, dtype=dtype)
    x, z = s.clone().requires_grad_(), s.clone().requires_grad_()
    with mock.patch.object(_switches, "pixel_kd_sum_path", lambda device: True), \
            mock.patch.object(ops, "softmax_kl", side_effect=AssertionError("took the unfused route")):
        got = idd_ops.channel_wise_distillation_loss(x, t, temperature=3.0, reduction=reduction)
    want = idd_ops.channel_wise_distillation_loss(z, t, temperature=3.0, reduction=reduction)
    ref = reference.channel_wise_distillation_loss(s.double(), t.double(), temperature=3.0, reduction=reduction)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, z.grad, rtol=tol, atol=tol * float(z.grad.abs().max()))


def test_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(2, 5, 12, dtype=torch.float16)
        slots = torch.empty(2, 12, dtype=torch.int16)
        loss, lse_s, lse_t, factor = ops._pixel_kd_sum(s, s, slots, 1.0, True)
        grad = ops._pixel_kd_sum_backward(torch.empty((), dtype=torch.float32), s, s, slots, lse_s, lse_t, factor, 1.0)
    assert (loss.shape, loss.dtype, lse_s.shape, lse_t.dtype, factor.dtype) == \
        ((), torch.float32, (2, 12), torch.float64, torch.float64)
    assert grad.shape == s.shape and grad.dtype == torch.float16


def test_opcheck(device):
    """The schema, fake kernel and autograd registration agree with the op on each device."""
    s, t, y = logits_and_labels(dtype=torch.float32)
    slots = ops._label_slots(y.to(device), 3, 4, 5, 255).view(2, 12)
    args = (s.reshape(2, 5, 12).to(device).requires_grad_(), t.reshape(2, 5, 12).to(device))
    torch.library.opcheck(ops._pixel_kd_sum.default, args + (slots, 2.0, True))
    torch.library.opcheck(ops._pixel_kd_sum.default, args + (None, 1.0, False))


@pytest.mark.parametrize("rows", [False, True], ids=["pixels", "rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_cpu_op_on_each_device(device, dtype, rows):
    """On a GPU the CUDA kernels give the CPU op's values and gradient: over pixels (pixel KD, with
    labels) and over contiguous rows ([B*C, H*W, 1], CWD's: rows of a warp and of a block)."""
    s, t, y = logits_and_labels(B=3, K=19, H=16, W=24, dtype=dtype)
    if rows:  # 57 rows of 384 (a warp each), then 3 of 7296 (a block each)
        s, t, y = s.reshape(57, 384, 1, 1), t.reshape(57, 384, 1, 1), None

    def loss_of(x):
        teacher = t.to(x.device)
        if not rows:
            return fused(x, teacher, y.to(x.device), 2.0, True)[0]
        loss = ops._pixel_kd_sum(x.reshape(57, 384, 1), teacher.reshape(57, 384, 1), None, 2.0, True)[0]
        return loss + ops._pixel_kd_sum(x.reshape(3, 7296, 1), teacher.reshape(3, 7296, 1), None, 3.0, False)[0]
    assert_devices_agree(loss_of, s, device, {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype])
