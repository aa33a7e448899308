import pytest
import torch

import idd_ops
from idd_ops import reference
from conftest import TOLERANCES, gradcheck, make_feats, make_labels

OPTIONS = [(m, nz, r) for m in ("euclidean", "sqeuclidean", "cosine") for nz in (None, "mean")
           for r in ("mean", "sum", "none")]
# (B, student C,H,W, teacher C,H,W, label Hy,Wy, K)
SHAPES = [
    (2, 5, 7, 9, 3, 5, 6, 21, 27, 4),
    (3, 4, 8, 8, 6, 8, 8, 8, 8, 5),
    (2, 6, 16, 32, 9, 16, 32, 128, 256, 19),
]


def _loss_and_grad(fn, s, t, y, K, opts):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, y, K, metric=opts[0], normalize=opts[1], reduction=opts[2])
    loss.double().sum().backward()
    return loss, s.grad


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, opts, shape):
    B, Cs, Hs, Ws, Ct, Ht, Wt, Hy, Wy, K = shape
    s = make_feats(B, Cs, Hs, Ws, device=device, seed=1)
    t = make_feats(B, Ct, Ht, Wt, device=device, seed=2)
    y = make_labels(B, Hy, Wy, K, device=device)
    la, ga = _loss_and_grad(idd_ops.inter_class_distance_loss, s, t, y, K, opts)
    lb, gb = _loss_and_grad(reference.inter_class_distance_loss, s, t, y, K, opts)
    assert la.shape == ((B,) if opts[2] == "none" else ())
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_low_precision_and_layouts(device, dtype, layout):
    kw = dict(channels_last=layout == "channels_last", strided=layout == "strided", device=device)
    s = make_feats(2, 8, 12, 10, dtype=dtype, seed=1, **kw)
    t = make_feats(2, 16, 12, 10, dtype=dtype, seed=2, **kw)
    y = make_labels(2, 48, 40, 6, device=device)
    opts = ("euclidean", "mean", "mean")
    la, ga = _loss_and_grad(idd_ops.inter_class_distance_loss, s, t, y, 6, opts)
    lb, gb = _loss_and_grad(reference.inter_class_distance_loss, s.double(), t.double(), y, 6, opts)
    tol = TOLERANCES[dtype]
    assert la.dtype == dtype and ga.dtype == dtype
    torch.testing.assert_close(la.double(), lb, rtol=tol, atol=tol * lb.abs().item())
    torch.testing.assert_close(ga.double(), gb, rtol=tol, atol=tol * gb.abs().max().item())


@pytest.mark.parametrize("opts", [("euclidean", None, "mean"), ("cosine", "mean", "none"), ("sqeuclidean", "mean", "sum")])
def test_gradcheck(device, opts):
    s = make_feats(2, 3, 5, 6, device=device, seed=1).requires_grad_()
    t = make_feats(2, 4, 3, 4, device=device, seed=2)
    y = make_labels(2, 10, 12, 4, device=device)
    fn = lambda x: idd_ops.inter_class_distance_loss(x, t, y, 4, metric=opts[0], normalize=opts[1], reduction=opts[2])
    assert gradcheck(fn, (s,))


def test_teacher_gets_no_gradient(device):
    s = make_feats(2, 3, 6, 6, device=device).requires_grad_()
    t = make_feats(2, 5, 6, 6, device=device, seed=3).requires_grad_()
    y = make_labels(2, 6, 6, 4, device=device)
    idd_ops.inter_class_distance_loss(s, t, y, 4).backward()
    assert t.grad is None and s.grad is not None


def test_loss_is_zero_when_student_equals_teacher(device):
    """Exactly zero where the centroids are computed in a fixed order (CPU; CUDA under
    use_deterministic_algorithms); within rounding of the atomic adds' order on CUDA otherwise."""
    s = make_feats(2, 4, 8, 8, device=device).requires_grad_()
    y = make_labels(2, 16, 16, 5, device=device)
    for deterministic in (True, False):
        s.grad = None
        torch.use_deterministic_algorithms(deterministic)
        try:
            loss = idd_ops.inter_class_distance_loss(s, s.detach() * 1.0, y, 5)
            loss.backward()
        finally:
            torch.use_deterministic_algorithms(False)
        if deterministic or device == "cpu":
            assert loss.item() == 0 and torch.count_nonzero(s.grad) == 0
        else:
            assert loss.item() < 1e-10 and s.grad.abs().max() < 1e-5


@pytest.mark.parametrize("lost_by", ["student", "teacher"])
@pytest.mark.parametrize("normalize", [None, "mean"])
def test_pairs_must_be_valid_for_both_networks(device, lost_by, normalize):
    """A class present for one network but absent at the other's resolution forms no pair, and
    each network's "mean" normaliser is over its own valid entries (METHOD.md 3 and 4): checked
    against a computation written here from the spec, which differs from both wrong readings
    (the pair kept; the normaliser over the joint pairs)."""
    y = torch.zeros(1, 4, 4, dtype=torch.long, device=device)
    y[0, 0, 0] = 1  # survives at 2x2, which samples rows/cols 0 and 2
    y[0, 3, 3] = 2  # lost at 2x2
    small, full = make_feats(1, 3, 2, 2, device=device, seed=1), make_feats(1, 3, 4, 4, device=device, seed=2)
    s, t = (small, full) if lost_by == "student" else (full, small)
    _, counts = idd_ops.class_centroids(small, y, 3)
    assert counts[0, 2] == 0 and counts[0, 1] == 1

    def distances(f):  # euclidean distances of the classes present at f's resolution, own mean
        c, n = reference.class_centroids(f.double(), y, 3)
        present = (n[0] > 0).nonzero().flatten().tolist()
        d = {(i, j): float((c[0, i] - c[0, j]).norm()) for i in present for j in present if i < j}
        m = sum(d.values()) / len(d) if normalize else 1.0
        return {k: v / m for k, v in d.items()}

    ds, dt = distances(s), distances(t)
    pairs = ds.keys() & dt.keys()
    assert len(pairs) == 1 and len(ds) + len(dt) == 4
    want = sum((ds[k] - dt[k]) ** 2 for k in pairs) / len(pairs)
    got = idd_ops.inter_class_distance_loss(s, t, y, 3, normalize=normalize, reduction="none")
    torch.testing.assert_close(got.double().cpu(), torch.tensor([want], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(reference.inter_class_distance_loss(s, t, y, 3, normalize=normalize, reduction="none"),
                               got)


@pytest.mark.parametrize("case", ["one_class", "all_ignored", "identical_centroids", "empty_batch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_degenerate_inputs_are_finite(device, case, reduction):
    B = 0 if case == "empty_batch" else 2
    s = make_feats(B, 3, 4, 4, device=device).requires_grad_()
    t = make_feats(B, 3, 4, 4, device=device, seed=5)
    y = make_labels(B, 4, 4, 3, device=device, ignore_frac=0)
    if case == "one_class":
        y.fill_(1)
    elif case == "all_ignored":
        y.fill_(255)
    elif case == "identical_centroids":  # two classes a pair, one centroid: distance 0 (eps floor)
        y[:, :2], y[:, 2:] = 0, 1
        s = torch.ones_like(s).requires_grad_()
    for normalize in (None, "mean"):
        for metric in ("euclidean", "cosine"):
            loss = idd_ops.inter_class_distance_loss(s, t, y, 3, metric=metric, normalize=normalize, reduction=reduction)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
            if case != "identical_centroids":
                assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(s.grad) == 0
            ref = reference.inter_class_distance_loss(s, t, y, 3, metric=metric, normalize=normalize, reduction=reduction)
            torch.testing.assert_close(loss, ref)


def test_module_matches_function(device):
    s = make_feats(2, 4, 8, 8, device=device).requires_grad_()
    t = make_feats(2, 6, 8, 8, device=device, seed=3)
    y = make_labels(2, 32, 32, 5, device=device)
    mod = idd_ops.nn.InterClassDistanceLoss(5, metric="cosine", normalize="mean")
    assert "cosine" in repr(mod)
    torch.testing.assert_close(mod(s, t, y), idd_ops.inter_class_distance_loss(s, t, y, 5, metric="cosine",
                                                                              normalize="mean"))


def test_opcheck_loss_op(device):
    ds = torch.rand(2, 4, 4, device=device, requires_grad=True)
    dt = torch.rand(2, 4, 4, device=device)
    n = torch.tensor([[3, 0, 2, 1], [1, 1, 1, 1]], device=device)
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.idd_ops.idd_loss.default, (ds, dt, n, n, reduction))


def test_deterministic_on_cpu():
    s = make_feats(4, 32, 16, 16, dtype=torch.float32).requires_grad_()
    t = make_feats(4, 64, 16, 16, dtype=torch.float32, seed=3)
    y = make_labels(4, 64, 64, 10)
    runs = []
    for _ in range(3):
        s.grad = None
        loss = idd_ops.inter_class_distance_loss(s, t, y, 10)
        loss.backward()
        runs.append((loss.detach().clone(), s.grad.clone()))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
