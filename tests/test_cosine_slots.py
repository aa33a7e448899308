"""_pixel_centroid_cosine_slots, IFVD's cosine op on the class-slot map of _label_slots (one
label decode per IFVD call; its backward saves the map): values and float64 gradients against
idd_ops/reference.py, the label maps of tests/labels.py that leave classes absent or every pixel
ignored, bad slot maps, and its place in intra_class_variation_loss. The CUDA cases run the slot
kernels."""
import pytest
import torch

import idd_ops
from idd_ops import _switches, reference
from conftest import gradcheck, make_feats, make_labels
from labels import CASES

ops = torch.ops.idd_ops
EDGE_CASES = [c for c in CASES if c.id in ("all-ignored", "one-class", "absent-classes", "clamped-cosine",
                                           "odd-sizes-ignore-minus-one")]


def _inputs(case, device, dtype=torch.float64):
    """feats [B, C, H, W], the reference's centroids [B, K, C] and the slot map of the case."""
    y = case.labels(device)
    feats = case.feats(dtype=dtype, device=device)
    centroids = reference.class_centroids(feats.double(), y, case.K, case.ignore_index)[0].to(dtype)
    slots = ops._label_slots(y, case.H, case.W, case.K, case.ignore_index)
    return feats, centroids, slots


@pytest.mark.parametrize("case", EDGE_CASES, ids=[c.id for c in EDGE_CASES])
def test_map_and_gradients_match_the_reference(device, case):
    feats, centroids, slots = _inputs(case, device)
    feats.requires_grad_(), centroids.requires_grad_()
    cos, norms = ops._pixel_centroid_cosine_slots(feats, centroids, slots, 1e-8)
    want = reference.pixel_centroid_cosine(feats, centroids, slots, 1e-8)
    torch.testing.assert_close(cos, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(feats.detach(), dim=1), rtol=1e-12, atol=1e-12)
    if case.id == "all-ignored":
        assert torch.equal(cos, torch.ones_like(cos))
    weight = torch.linspace(0.5, 1.5, cos.numel(), dtype=torch.float64, device=device).view(cos.shape)
    got = torch.autograd.grad((cos * weight).sum(), (feats, centroids))
    expected = torch.autograd.grad((want * weight).sum(), (feats, centroids))
    for g, w in zip(got, expected):  # a zero centroid (clamped-cosine) scales its gradient by 1 / eps
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8 * float(w.abs().max()))


def _own_centroids(feats, y, case):
    """The class means of feats (differentiable through feats) and their counts, from labels y."""
    return reference.class_centroids(feats, y, case.K, case.ignore_index)


@pytest.mark.parametrize("case", EDGE_CASES, ids=[c.id for c in EDGE_CASES])
def test_own_centroids_carry_their_gradient_to_feats(device, case):
    """With counts, the centroids are feats' own class means: feats' gradient is the whole one, the
    reference's through both the map and the centroids (IFVD's student on the class-sum path)."""
    y = case.labels(device)
    feats, _, slots = _inputs(case, device)
    feats.requires_grad_()
    centroids, counts = _own_centroids(feats.detach(), y, case)
    cos, _ = ops._pixel_centroid_cosine_slots(feats, centroids, slots, 1e-8, counts)
    want = reference.pixel_centroid_cosine(feats, _own_centroids(feats, y, case)[0], slots, 1e-8)
    torch.testing.assert_close(cos, want, rtol=1e-10, atol=1e-12)
    weight = torch.linspace(0.5, 1.5, cos.numel(), dtype=torch.float64, device=device).view(cos.shape)
    got = torch.autograd.grad((cos * weight).sum(), feats)[0]
    expected = torch.autograd.grad((want * weight).sum(), feats)[0]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))


def test_own_centroids_backward_outputs(device):
    """The backward with counts: grad_feats is the one without counts plus each pixel's share
    grad_centroids[k] / counts[k]; grad_centroids is the same as without counts."""
    case = next(c for c in CASES if c.id == "absent-classes")
    y = case.labels(device)
    feats, _, slots = _inputs(case, device)
    centroids, counts = _own_centroids(feats, y, case)
    cos, norms = ops._pixel_centroid_cosine_slots(feats, centroids, slots, 1e-8)
    grad = torch.linspace(-1, 1, cos.numel(), dtype=torch.float64, device=device).view(cos.shape)
    plain_f, plain_c = ops._pixel_centroid_cosine_slots_backward(grad, feats, centroids, slots, cos, norms, 1e-8)
    own_f, own_c = ops._pixel_centroid_cosine_slots_backward(grad, feats, centroids, slots, cos, norms, 1e-8, counts)
    torch.testing.assert_close(own_c, plain_c, rtol=1e-12, atol=1e-14)
    share = plain_c / counts.clamp_min(1)[..., None]
    want = plain_f + ops._class_sums_backward(share, slots, torch.float64, False)
    torch.testing.assert_close(own_f, want, rtol=1e-10, atol=1e-12)
    assert (counts == 0).any()  # the case leaves a class absent: its share goes nowhere


def test_own_centroids_gradcheck():
    K = 4
    y = make_labels(2, 5, 7, K, ignore_frac=0.2, blocky=False)
    slots = ops._label_slots(y, 5, 7, K, 255)
    feats = make_feats(2, 3, 5, 7).requires_grad_()

    def cosine(f):
        centroids, counts = reference.class_centroids(f.detach(), y, K)
        return ops._pixel_centroid_cosine_slots(f, centroids, slots, 1e-8, counts)[0]
    assert gradcheck(cosine, (feats,))


def test_own_centroids_must_be_constants():
    feats = make_feats(2, 3, 4, 5).requires_grad_()
    centroids = torch.ones(2, 4, 3, dtype=torch.float64, requires_grad=True)
    counts = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="centroids: with counts"):
        ops._pixel_centroid_cosine_slots(feats, centroids, _good_slots(), 1e-8, counts)
    with torch.no_grad():  # no gradient to route: no error
        ops._pixel_centroid_cosine_slots(feats, centroids, _good_slots(), 1e-8, counts)


@pytest.mark.parametrize("counts,error,text", [
    (torch.ones(2, 4, dtype=torch.int32), TypeError, "counts: expected int64"),
    (torch.ones(2, 3, dtype=torch.long), ValueError, r"counts: expected shape \[2, 4\]"),
])
def test_bad_counts_raise(counts, error, text):
    feats = make_feats(2, 3, 4, 5)
    cent = torch.ones(2, 4, 3, dtype=torch.float64)
    with pytest.raises(error, match=text):
        ops._pixel_centroid_cosine_slots(feats, cent, _good_slots(), 1e-8, counts)
    cos, norms = ops._pixel_centroid_cosine_slots(feats, cent, _good_slots(), 1e-8)
    with pytest.raises(error, match=text):
        ops._pixel_centroid_cosine_slots_backward(torch.ones_like(cos), feats, cent, _good_slots(), cos, norms, 1e-8,
                                                  counts)


def test_equals_the_labels_op(device):
    """The same map and gradients as pixel_centroid_cosine on the labels the slot map came from
    (resized up, with ignored pixels): bit for bit on the CPU; on CUDA the slot forward adds each
    pixel's channels in 8 partial sums and the labels kernel in one fused multiply-add chain, and
    the labels backward adds the class sums with float atomics."""
    K = 5
    y = make_labels(2, 24, 40, K, device=device)
    feats = make_feats(2, 6, 12, 20, dtype=torch.float32, device=device)
    centroids = idd_ops.class_centroids(feats, y, K)[0]
    slots = ops._label_slots(y, 12, 20, K, 255)
    grad = make_feats(2, 1, 12, 20, dtype=torch.float32, device=device)[:, 0]
    cos, norms = ops._pixel_centroid_cosine_slots(feats, centroids, slots, 1e-8)
    cos_l, norms_l = ops.pixel_centroid_cosine(feats, centroids, y, 255, 1e-8)
    rtol = 0 if device == "cpu" else 1e-5
    torch.testing.assert_close(cos, cos_l, rtol=rtol, atol=rtol)
    torch.testing.assert_close(norms, norms_l, rtol=rtol, atol=rtol * float(norms_l.max()))
    back = ops._pixel_centroid_cosine_slots_backward(grad, feats, centroids, slots, cos, norms, 1e-8)
    back_l = ops._pixel_centroid_cosine_backward(grad, feats, centroids, y, cos, norms, 255, 1e-8)
    for g, w in zip(back, back_l):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()))


def test_gradcheck():
    y = make_labels(2, 5, 7, 4, ignore_frac=0.2, blocky=False)
    feats = make_feats(2, 3, 5, 7).requires_grad_()
    centroids = make_feats(2, 4, 3, 1, seed=1)[..., 0].requires_grad_()
    slots = ops._label_slots(y, 5, 7, 4, 255)
    assert gradcheck(lambda f, c: ops._pixel_centroid_cosine_slots(f, c, slots, 1e-8)[0],
                                    (feats, centroids))


def test_backward_saves_the_slot_map():
    """What autograd keeps for the backward: the int16 slot map, no labels."""
    saved = []
    feats = make_feats(2, 3, 4, 5).requires_grad_()
    slots = _good_slots()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops._pixel_centroid_cosine_slots(feats, torch.ones(2, 4, 3, dtype=torch.float64), slots, 1e-8)
    integer = [t for t in saved if not t.is_floating_point()]
    assert len(integer) == 1 and integer[0].dtype == torch.int16 and integer[0].shape == slots.shape


def test_opcheck(device):
    f = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    c = torch.randn(2, 4, 3, device=device, requires_grad=True)
    slots = ops._label_slots(make_labels(2, 8, 10, 4, device=device), 4, 5, 4, 255)
    torch.library.opcheck(ops._pixel_centroid_cosine_slots.default, (f, c, slots, 1e-8))
    counts = torch.ones(2, 4, dtype=torch.long, device=device)
    torch.library.opcheck(ops._pixel_centroid_cosine_slots.default, (f, c.detach(), slots, 1e-8, counts))


def _call(slots, feats=None, K=4):
    feats = make_feats(2, 3, 4, 5) if feats is None else feats
    return ops._pixel_centroid_cosine_slots(feats, torch.ones(2, K, 3, dtype=torch.float64), slots, 1e-8)


def _good_slots():
    return ops._label_slots(make_labels(2, 4, 5, 4), 4, 5, 4, 255)


@pytest.mark.parametrize("slots,error,text", [
    (_good_slots().int(), TypeError, "slots: expected int16"),
    (_good_slots()[:, :3], ValueError, r"slots: expected shape \[2, 4, 5\]"),
    (_good_slots()[:1], ValueError, "slots: batch size 1"),
    (_good_slots()[0], ValueError, "slots: expected a 3-D"),
    (torch.full((2, 4, 5), 4, dtype=torch.int16), ValueError, r"slots: value 4 at image 0 is outside \[-1, num_classes=4\)"),
    (torch.full((2, 4, 5), -2, dtype=torch.int16), ValueError, r"slots: value -2 .* outside \[-1"),
])
def test_bad_slots_raise(slots, error, text):
    with pytest.raises(error, match=text):
        _call(slots)


def test_bad_slots_raise_in_the_backward():
    feats = make_feats(2, 3, 4, 5)
    cent = torch.ones(2, 4, 3, dtype=torch.float64)
    cos, norms = ops._pixel_centroid_cosine_slots(feats, cent, _good_slots(), 1e-8)
    bad = _good_slots()
    bad[1, 2, 3] = 7
    with pytest.raises(ValueError, match="slots: value 7 at image 1"):
        ops._pixel_centroid_cosine_slots_backward(torch.ones_like(cos), feats, cent, bad, cos, norms, 1e-8)
    with pytest.raises(ValueError, match="slots: expected shape"):
        ops._pixel_centroid_cosine_slots_backward(torch.ones_like(cos), feats, cent, bad[:, 1:], cos, norms, 1e-8)


def test_ifvd_reads_the_slot_map_once(monkeypatch):
    """On the CPU, intra_class_variation_loss decodes the labels once per call (one _label_slots)
    and its forward and backward read that map: the labels op is never called."""
    calls = []
    real = {name: getattr(ops, name) for name in ("_label_slots", "pixel_centroid_cosine")}

    class Spy:
        def __getattr__(self, name):
            if name in real:
                calls.append(name)
            return getattr(torch.ops.idd_ops, name)

    from idd_ops import _class_sums, baselines
    monkeypatch.setattr(baselines, "ops", Spy())
    monkeypatch.setattr(_class_sums, "ops", Spy())
    s = make_feats(2, 4, 6, 8).requires_grad_()
    y = make_labels(2, 12, 16, 3)
    for sums in (False, True):
        calls.clear()
        monkeypatch.setattr(_switches, "cpu_sums", sums)
        loss = idd_ops.intra_class_variation_loss(s, make_feats(2, 5, 6, 8, seed=1), y, 3)
        loss.backward()
        assert calls == ["_label_slots"], (sums, calls)
        want = reference.intra_class_variation_loss(s.detach(), make_feats(2, 5, 6, 8, seed=1), y, 3)
        torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=1e-14)
