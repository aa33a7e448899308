"""Many classes (ADE20K's 150 up to 2048: on CUDA the centroid kernel then opts in to more
shared memory) and wide features (C = 2048), against the reference; and the ordered centroid
path that CUDA takes under torch.use_deterministic_algorithms(True)."""
import pytest
import torch

import idd_ops
from idd_ops import reference
from conftest import EMULATE_CUDA, TOLERANCES, make_feats, make_labels

ops = torch.ops.idd_ops


def sparse_labels(B, H, W, K, present=24, seed=0, device="cpu"):
    """Labels drawn from `present` class ids spread over [0, K) (K - 1 included), with ignored
    pixels; returns the labels and the same map with classes renumbered 0 .. present - 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randperm(K - 1, generator=g)[:present - 1], torch.tensor([K - 1])]).sort().values
    compact = make_labels(B, H, W, present, seed=seed)
    full = torch.where(compact == 255, compact, ids[compact.clamp_max(present - 1)])
    return full.to(device), compact.to(device), ids.to(device)


@pytest.mark.parametrize("K", [150, 1000, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_classes(device, K, dtype):
    B, C, H, W, present = 2, 16, 24, 20, 24
    y, y_compact, ids = sparse_labels(B, 48, 40, K, present, device=device)
    s = make_feats(B, C, H, W, dtype=dtype, device=device, seed=1)
    t = make_feats(B, 2 * C, H, W, dtype=dtype, device=device, seed=2)
    tol = TOLERANCES[dtype]

    # centroids of all K classes against the one-hot reference
    ca, na = idd_ops.class_centroids(s, y, K)
    cb, nb = reference.class_centroids(s, y, K)
    assert torch.equal(na, nb) and int((na > 0).sum(1).max()) <= present
    torch.testing.assert_close(ca, cb, rtol=tol, atol=tol)

    # distances: the present classes' block equals the reference's on those classes, the rest is 0
    d = idd_ops.class_distance_matrix(ca, na, "euclidean", "mean")
    d_ref = reference.class_distance_matrix(cb[:, ids], nb[:, ids], "euclidean", "mean")
    torch.testing.assert_close(d[:, ids][:, :, ids], d_ref, rtol=tol, atol=tol)
    assert float(d.abs().sum()) == pytest.approx(float(d_ref.abs().sum()), rel=tol)

    # the loss and its gradient: absent classes add nothing, so K classes == the compact ones
    for fn, labels, k in ((idd_ops.inter_class_distance_loss, y, K),
                          (reference.inter_class_distance_loss, y_compact, present)):
        x = s.detach().clone().requires_grad_()
        loss = fn(x, t, labels, k, normalize="mean")
        loss.backward()
        if fn is idd_ops.inter_class_distance_loss:
            got = (loss, x.grad)
    torch.testing.assert_close(got[0], loss, rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], x.grad, rtol=tol, atol=tol * float(x.grad.abs().max()))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_more_classes_than_a_slot_map_holds_in_every_layout(device, layout):
    """Past 32767 classes (the int16 slot map's limit) the class passes take the centroid op in
    every layout: channels_last features and tokens once raised "class slots are int16" where
    NCHW worked. class_centroids and IFVD against the reference (IDD takes the same path, but its
    K x K matrices would need gigabytes here). On CUDA the centroid op's per-class sums do not fit
    a block's shared memory at this K (72 bytes a class against an H100/H200's 227 KiB): a
    ValueError naming num_classes (docs/API.md), where the CPU op has no such limit."""
    B, C, H, W, K = 1, 3, 4, 6, 40000
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (B, H, W), generator=g).to(device)
    s = make_feats(B, C, H, W, device=device, seed=1)
    t = make_feats(B, C + 2, H, W, device=device, seed=2)
    size = None
    if layout == "channels_last":
        s, t = (f.contiguous(memory_format=torch.channels_last) for f in (s, t))
    elif layout == "tokens":
        s, t, size = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2), (H, W)
    if device == "cuda" or EMULATE_CUDA:
        with pytest.raises(ValueError, match="num_classes: 40000 classes need"):
            idd_ops.class_centroids(s, y, K, size=size)
        with pytest.raises(ValueError, match="num_classes: 40000 classes need"):
            idd_ops.intra_class_variation_loss(s, t, y, K, size=size)
        return
    c, n = idd_ops.class_centroids(s, y, K, size=size)
    feats = s if size is None else s.transpose(1, 2).reshape(B, C, H, W)
    c_ref, n_ref = reference.class_centroids(feats, y, K)
    assert torch.equal(n, n_ref)
    torch.testing.assert_close(c, c_ref)
    if size is None:
        torch.testing.assert_close(idd_ops.intra_class_variation_loss(s, t, y, K),
                                   reference.intra_class_variation_loss(s, t, y, K))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_wide_features(device, metric):
    """C = 2048 (a ResNet-50/101 teacher's width), beside a 512-channel student."""
    B, H, W, K = 2, 8, 12, 19
    s = make_feats(B, 512, H, W, dtype=torch.float32, device=device, seed=1)
    t = make_feats(B, 2048, H, W, dtype=torch.float32, device=device, seed=2)
    y = make_labels(B, 32, 48, K, device=device)
    ca, na = idd_ops.class_centroids(t, y, K)
    cb, nb = reference.class_centroids(t, y, K)
    torch.testing.assert_close(ca, cb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(idd_ops.class_distance_matrix(ca, na, metric),
                               reference.class_distance_matrix(cb, nb, metric), rtol=1e-4, atol=1e-5)
    results = []
    for fn in (idd_ops.inter_class_distance_loss, reference.inter_class_distance_loss):
        x = s.detach().clone().requires_grad_()
        loss = fn(x, t, y, K, metric=metric)
        loss.backward()
        results.append((loss, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4 * float(results[1][1].abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_size", [(15, 17), (45, 34), (8, 40)])
def test_ordered_centroids_match_reference(device, dtype, label_size):
    x = make_feats(3, 5, 15, 17, dtype=dtype, device=device)
    y = make_labels(3, *label_size, 6, device=device, blocky=False)
    y[0] = 255  # an image with every pixel ignored
    ca, na = ops._class_centroids_ordered(x, y, 6, 255)
    cb, nb = reference.class_centroids(x, y, 6)
    assert ca.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(na, nb)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(ca, cb.to(ca.dtype), rtol=tol, atol=tol)
    # and it agrees with the fused op
    cf, nf = ops.class_centroids(x, y, 6, 255)
    assert torch.equal(na, nf)
    torch.testing.assert_close(ca, cf, rtol=tol, atol=tol)


def test_ordered_centroids_reject_bad_labels():
    x = make_feats(1, 2, 4, 4)
    with pytest.raises(ValueError, match="labels"):
        ops._class_centroids_ordered(x, torch.full((1, 4, 4), 9), 3, 255)


def test_deterministic_centroids_repeat_bitwise(device):
    """Under use_deterministic_algorithms the centroids (and the IDD loss built on them) repeat
    bit for bit on every device; on CUDA this takes the ordered path."""
    s = make_feats(4, 64, 32, 32, dtype=torch.float32, device=device, seed=1).requires_grad_()
    t = make_feats(4, 128, 32, 32, dtype=torch.float32, device=device, seed=2)
    y = make_labels(4, 64, 64, 12, device=device, blocky=False)
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            s.grad = None
            c, _ = idd_ops.class_centroids(s, y, 12)
            loss = idd_ops.inter_class_distance_loss(s, t, y, 12)
            loss.backward()
            runs.append((c.detach().clone(), loss.detach().clone(), s.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(False)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
