import pytest
import torch

import idd_ops
from idd_ops import reference
from conftest import gradcheck

METRICS = ["euclidean", "sqeuclidean", "cosine"]
NORMALIZE = [None, "mean"]


def make_centroids(B=3, K=6, C=5, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, K, C, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    counts = torch.randint(1, 50, (B, K), generator=g)
    counts[0, 1] = 0  # an absent class
    counts[1, :] = 0  # an image with one present class only
    counts[1, 2] = 7
    return c, counts.to(device)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 5e-2)])
def test_matches_reference(device, metric, normalize, dtype, tol):
    c, n = make_centroids(device=device, dtype=dtype)
    w = torch.randn(3, 6, 6, dtype=torch.float64, device=device)
    ca = c.clone().requires_grad_()
    cb = c.double().requires_grad_()
    da = idd_ops.class_distance_matrix(ca, n, metric, normalize)
    db = reference.class_distance_matrix(cb, n, metric, normalize)
    (da.double() * w).sum().backward()
    (db * w).sum().backward()
    assert da.dtype == dtype
    torch.testing.assert_close(da.double(), db, rtol=tol, atol=tol)
    torch.testing.assert_close(ca.grad.double(), cb.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck(device, metric, normalize):
    c, n = make_centroids(device=device)
    c.requires_grad_()
    assert gradcheck(lambda x: idd_ops.class_distance_matrix(x, n, metric, normalize), (c,))


@pytest.mark.parametrize("metric", METRICS)
def test_structure(device, metric):
    c, n = make_centroids(device=device)
    d = idd_ops.class_distance_matrix(c, n, metric)
    torch.testing.assert_close(d, d.transpose(1, 2))
    assert torch.count_nonzero(torch.diagonal(d, dim1=1, dim2=2)) == 0
    assert torch.count_nonzero(d[0, 1]) == 0 and torch.count_nonzero(d[0, :, 1]) == 0  # absent class
    assert torch.count_nonzero(d[1]) == 0  # one present class: no pair


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_identical_and_zero_centroids_are_finite(device, metric, normalize):
    c = torch.zeros(2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    n = torch.ones(2, 4, dtype=torch.long, device=device)
    d = idd_ops.class_distance_matrix(c, n, metric, normalize)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(c.grad).all()
    if metric != "cosine":
        assert torch.count_nonzero(d) == 0 and torch.count_nonzero(c.grad) == 0


@pytest.mark.parametrize("metric,scale", [("euclidean", 1e-9), ("sqeuclidean", 2e-5)])
def test_normaliser_floored_at_eps_is_a_constant(device, metric, scale):
    """Centroids so close that the mean distance is below eps: D = R / eps, whose gradient has no
    term through the (clamped, constant) normaliser. Guards the backward's where(clamped, ...)."""
    c, n = make_centroids(device=device)
    c = (scale * c).requires_grad_()
    present = n.gt(0).sum(1)
    mean = reference.class_distance_matrix(c.detach(), n, metric).sum((1, 2)) / (present * (present - 1)).clamp_min(1)
    assert (mean[present > 1] < 1e-8).all() and (mean[present > 1] > 1e-10).all()  # floored, above rounding
    w = torch.randn(3, 6, 6, dtype=torch.float64, device=device)
    (ga,) = torch.autograd.grad((idd_ops.class_distance_matrix(c, n, metric, "mean") * w).sum(), c)
    (gb,) = torch.autograd.grad((reference.class_distance_matrix(c, n, metric, "mean") * w).sum(), c)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-9 * gb.abs().max().item())


def test_normalize_mean_is_scale_free(device):
    c, n = make_centroids(device=device)
    for metric in METRICS:
        a = idd_ops.class_distance_matrix(c, n, metric, "mean")
        b = idd_ops.class_distance_matrix(7.5 * c, n, metric, "mean")
        torch.testing.assert_close(a, b)


def test_opcheck(device):
    c, n = make_centroids(device=device, dtype=torch.float32)
    c.requires_grad_()
    for metric in METRICS:
        torch.library.opcheck(torch.ops.idd_ops.class_distance_matrix.default, (c, n, metric, True, 1e-8))
