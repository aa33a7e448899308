"""_class_means, the class-sum path's centroids in one op (sums / max(count, 1), divided in float64
and rounded once), and its backward: the bits of the ATen route it replaces in every output
dtype (the ATen formulation here; the CUDA kernels in test_cuda_emulated_class_means.py), its
gradient, its fake kernel, and class_centroids through it."""
from unittest import mock

import pytest
import torch

import idd_ops
from idd_ops import _switches

ops = torch.ops.idd_ops
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def sums_and_counts(B=2, K=5, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (B, K), generator=g)
    counts[0, -1] = 0  # an absent class: its sum is 0, its mean 0
    sums = torch.randn(B, K, C, generator=g, dtype=torch.float64) * counts[..., None]
    return sums, counts


def aten_route(sums, counts, dtype):
    return (sums / counts.clamp_min(1)[..., None]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_aten_route_it_replaces(dtype):
    sums, counts = sums_and_counts()
    x = sums.clone().requires_grad_()
    got = ops._class_means(x, counts, dtype)
    assert got.dtype == dtype and torch.equal(got, aten_route(sums, counts, dtype))
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = sums.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(aten_route(y, counts, dtype), y, grad)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert got_grad.dtype == torch.float64 and torch.equal(got_grad, want_grad)


def test_gradient_and_fake_kernel():
    sums, counts = sums_and_counts()
    assert torch.autograd.gradcheck(lambda s: ops._class_means(s, counts, torch.float64), (sums.requires_grad_(),))
    torch.library.opcheck(ops._class_means.default, (sums, counts, torch.float32))
    torch.library.opcheck(ops._class_means_backward.default, (torch.randn(2, 5, 7), counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_centroids_through_the_op(dtype):
    """class_centroids on the class-sum path with the switch on (CUDA's under IDD_OPS_CUDA_NEXT=1)
    takes the op, with the values and gradient of the route without it."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 6, 8, 12, generator=g).to(dtype)
    labels = torch.randint(0, 4, (2, 16, 24), generator=g)
    labels[0, :4] = 255
    results = []
    with mock.patch.object(_switches, "class_sums_path", lambda device, channels_last=False: True):
        for on in (False, True):
            x = feats.clone().requires_grad_()
            with mock.patch.object(_switches, "class_means_path", lambda device: on), \
                    mock.patch.object(ops, "_class_means", wraps=ops._class_means) as spy:
                centroids, counts = idd_ops.class_centroids(x, labels, 5)
                (centroids.double() * torch.linspace(0.5, 1.5, centroids.numel()).view(centroids.shape)).sum().backward()
            assert spy.called == on
            results.append((centroids, counts, x.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
