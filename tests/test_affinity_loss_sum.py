"""_affinity_loss_sum, SKD reduced in one op (affinity_loss's per-image means added in float64 and
scaled by 1 / B for "mean", P * P for "sum"), and its backward: the reference's value and gradient,
gradcheck, no images, the loss's dtype, the fake kernel, and structural_kd_loss through it (the
CUDA kernels: test_cuda_emulated_skd.py)."""
from unittest import mock

import pytest
import torch

import idd_ops
from conftest import assert_devices_agree
from idd_ops import _switches, reference

ops = torch.ops.idd_ops


def feats(B=3, Cs=5, Ct=7, H=7, W=9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, Cs, H, W, generator=g, dtype=torch.float64)
    t = s[:, :min(Cs, Ct)].repeat(1, -(-Ct // Cs), 1, 1)[:, :Ct] * 0.5 + torch.randn(B, Ct, H, W, generator=g,
                                                                                       dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("pool", [1, 2, 3])
@pytest.mark.parametrize("channels", [(5, 7), (6, 6), (8, 3)], ids=["Cs<Ct", "Cs=Ct", "Cs>Ct"])
def test_the_reference(mean, pool, channels):
    s, t = feats(Cs=channels[0], Ct=channels[1])
    x = s.clone().requires_grad_()
    loss, gss, gsd = ops._affinity_loss_sum(x, t, pool, mean)
    reduction = "mean" if mean else "sum"
    ref_x = s.clone().requires_grad_()
    want = reference.structural_kd_loss(ref_x, t, pool, reduction=reduction)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=0)
    (got_grad,) = torch.autograd.grad(loss, x)
    (want_grad,) = torch.autograd.grad(want, ref_x)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10 * float(want_grad.abs().max()))
    _, want_gss, want_gsd = ops.affinity_loss(s, t, pool)  # the Grams its backward reads
    assert torch.equal(gss, want_gss) and torch.equal(gsd, want_gsd)


def test_gradcheck():
    s, t = feats(B=2, Cs=3, Ct=4, H=5, W=4)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops._affinity_loss_sum(x, t, 2, True)[0], (x,))
    assert torch.autograd.gradcheck(lambda x: ops._affinity_loss_sum(x, t, 1, False)[0], (x,))


def test_a_gradient_of_any_one_value_shape():
    """The backward takes the loss's gradient as one value of any shape ([] or [1]), as the other
    reduced ops' backwards do."""
    s, t = feats()
    _, gss, gsd = ops._affinity_loss_sum(s, t, 2, True)
    got = ops._affinity_loss_sum_backward(torch.full((1,), 2.0, dtype=torch.float64), s, t, gss, gsd, 2, True)
    want = ops._affinity_loss_backward(torch.full((3,), 2.0 / 3, dtype=torch.float64), s, t, gss, gsd, 2)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_no_images():
    """No images: "mean" and "sum" are 0 (reduce's rule for nothing counted, as structural_kd_loss
    gives without the op), the gradient empty."""
    x = torch.zeros(0, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    for mean in (True, False):
        loss = ops._affinity_loss_sum(x, torch.zeros(0, 5, 6, 6, dtype=torch.float64), 2, mean)[0]
        (grad,) = torch.autograd.grad(loss, x)
        assert float(loss.detach()) == 0 and grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_loss_in_the_accumulation_dtype(dtype):
    s, t = feats(dtype=dtype)
    loss = ops._affinity_loss_sum(s, t, 2, True)[0]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    want = reference.structural_kd_loss(s.double(), t.double(), 2)
    torch.testing.assert_close(loss.double(), want, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_structural_kd_loss_through_it(reduction, dtype):
    """structural_kd_loss takes the op where _switches.affinity_sum_path says so (CUDA under
    IDD_OPS_CUDA_NEXT=1; forced here): the per-image route's value, dtype and gradient; "none"
    keeps that route."""
    s, t = feats(dtype=dtype)
    x, z = s.clone().requires_grad_(), s.clone().requires_grad_()
    with mock.patch.object(_switches, "affinity_sum_path", lambda device: True), \
            mock.patch.object(ops, "affinity_loss", side_effect=AssertionError("took the per-image route")):
        got = idd_ops.structural_kd_loss(x, t, reduction=reduction)
        with pytest.raises(AssertionError, match="per-image route"):
            idd_ops.structural_kd_loss(x, t, reduction="none")
    want = idd_ops.structural_kd_loss(z, t, reduction=reduction)
    assert got.dtype == want.dtype == dtype and got.dim() == 0
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, z.grad, rtol=tol, atol=tol * float(z.grad.abs().max()))


def test_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s, t = torch.empty(2, 5, 8, 8, dtype=torch.bfloat16), torch.empty(2, 7, 8, 8, dtype=torch.bfloat16)
        loss, gss, gsd = ops._affinity_loss_sum(s, t, 2, True)
        grad = ops._affinity_loss_sum_backward(torch.empty((), dtype=torch.float32), s, t, gss, gsd, 2, True)
    assert (loss.shape, loss.dtype, gss.shape, gsd.shape, gsd.dtype) == \
        ((), torch.float32, (2, 5, 5), (2, 5, 7), torch.float32)
    assert grad.shape == s.shape and grad.dtype == torch.bfloat16


def test_opcheck(device):
    """The schema, fake kernel and autograd registration agree with the op on each device."""
    s, t = feats(dtype=torch.float32)
    args = (s.to(device).requires_grad_(), t.to(device))
    torch.library.opcheck(ops._affinity_loss_sum.default, args + (2, True))
    torch.library.opcheck(ops._affinity_loss_sum.default, args + (1, False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_cpu_op_on_each_device(device, dtype):
    """On a GPU the CUDA kernels give the CPU op's value and gradient, over several chunks (B = 9 at
    pool 2: chunks of 4, 4 and 1)."""
    s, t = feats(B=9, Cs=24, Ct=40, H=16, W=20, dtype=dtype)

    def loss_of(x):
        teacher = t.to(x.device)
        return ops._affinity_loss_sum(x, teacher, 2, True)[0] + ops._affinity_loss_sum(x, teacher, 3, False)[0]
    assert_devices_agree(loss_of, s, device, {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype])
