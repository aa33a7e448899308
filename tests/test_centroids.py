import pytest
import torch

import idd_ops
from idd_ops import reference
from conftest import TOLERANCES, gradcheck, make_feats, make_labels

# (B, C, H, W, Hy, Wy, K): odd and prime sizes, 1x1, labels above and equal to feature size
SHAPES = [
    (2, 5, 7, 9, 21, 27, 4),
    (3, 3, 8, 8, 8, 8, 5),
    (1, 1, 1, 1, 5, 3, 2),
    (2, 4, 13, 11, 100, 61, 7),
    (2, 6, 16, 32, 128, 256, 19),
]


def _grad_pair(fn_a, fn_b, x, weight):
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().double().requires_grad_()
    ca, na = fn_a(xa)
    cb, nb = fn_b(xb)
    (ca.double() * weight).sum().backward()
    (cb * weight).sum().backward()
    return ca, cb, na, nb, xa.grad, xb.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_matches_reference(device, shape, dtype):
    B, C, H, W, Hy, Wy, K = shape
    x = make_feats(B, C, H, W, dtype=dtype, device=device)
    y = make_labels(B, Hy, Wy, K, device=device)
    weight = torch.randn(B, K, C, dtype=torch.float64, device=device)
    ca, cb, na, nb, ga, gb = _grad_pair(lambda f: idd_ops.class_centroids(f, y, K),
                                        lambda f: reference.class_centroids(f, y, K), x, weight)
    tol = TOLERANCES[dtype]
    assert ca.dtype == dtype and ga.dtype == dtype and na.dtype == torch.int64
    assert torch.equal(na, nb)
    torch.testing.assert_close(ca.double(), cb, rtol=tol, atol=tol * max(float(cb.abs().max()), 1e-3))
    torch.testing.assert_close(ga.double(), gb, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_non_contiguous_features(device, layout):
    x = make_feats(2, 6, 9, 10, device=device, channels_last=layout == "channels_last", strided=layout == "strided")
    y = make_labels(2, 27, 30, 5, device=device)
    c, n = idd_ops.class_centroids(x, y, 5)
    cr, nr = reference.class_centroids(x, y, 5)
    torch.testing.assert_close(c, cr)
    assert torch.equal(n, nr)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes_and_strided_labels(device, label_dtype):
    x = make_feats(2, 3, 6, 7, device=device)
    y = make_labels(2, 12, 14, 4, device=device, ignore_frac=0.0)
    if label_dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        y[:, :2] = 255
    y_t = y.to(label_dtype).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous view
    c, n = idd_ops.class_centroids(x, y_t, 4)
    cr, nr = reference.class_centroids(x, y, 4)
    torch.testing.assert_close(c, cr)
    assert torch.equal(n, nr)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (7, 5), (33, 17), (64, 128)])
@pytest.mark.parametrize("label_size", [(7, 13), (100, 100), (512, 1024), (1, 1)])
def test_resize_matches_interpolate(size, label_size):
    """Counts reveal the resized labels: they must equal F.interpolate's nearest for any ratio."""
    K = 6
    y = torch.randint(0, K, (1, *label_size))
    x = torch.zeros(1, 1, *size, dtype=torch.float64)
    _, n = idd_ops.class_centroids(x, y, K)
    _, nr = reference.class_centroids(x, y, K)
    assert torch.equal(n, nr)


def test_gradcheck(device):
    x = make_feats(2, 3, 5, 6, device=device).requires_grad_()
    y = make_labels(2, 15, 18, 4, device=device)
    assert gradcheck(lambda f: idd_ops.class_centroids(f, y, 4)[0], (x,))


def test_absent_and_ignored_classes_are_zero(device):
    x = make_feats(2, 3, 4, 4, device=device).requires_grad_()
    y = torch.zeros(2, 4, 4, dtype=torch.long, device=device)
    y[1] = 255  # image 1 is entirely ignored
    c, n = idd_ops.class_centroids(x, y, 3)
    assert n.tolist() == [[16, 0, 0], [0, 0, 0]]
    assert torch.count_nonzero(c[0, 1:]) == 0 and torch.count_nonzero(c[1]) == 0
    torch.testing.assert_close(c[0, 0], x[0].mean((1, 2)))
    c.sum().backward()
    assert torch.count_nonzero(x.grad[1]) == 0 and torch.isfinite(x.grad).all()


def test_empty_batch(device):
    x = torch.zeros(0, 4, 5, 5, device=device, requires_grad=True)
    y = torch.zeros(0, 10, 10, dtype=torch.long, device=device)
    c, n = idd_ops.class_centroids(x, y, 3)
    assert c.shape == (0, 3, 4) and n.shape == (0, 3)
    c.sum().backward()
    assert x.grad.shape == x.shape


def test_opcheck(device):
    x = make_feats(2, 3, 5, 6, dtype=torch.float32, device=device).requires_grad_()
    y = make_labels(2, 10, 12, 4, device=device)
    torch.library.opcheck(torch.ops.idd_ops.class_centroids.default, (x, y, 4, 255))


def test_counts_without_channels_and_unsigned_labels():
    y = torch.tensor([[[0, 1], [1, 255]]], dtype=torch.uint16)
    c, n = idd_ops.class_centroids(torch.zeros(1, 0, 2, 2), y, 2)
    assert c.shape == (1, 2, 0) and n.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="labels: value 7"):
        idd_ops.class_centroids(torch.zeros(1, 0, 2, 2), torch.full((1, 2, 2), 7), 2)
