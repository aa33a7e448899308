"""The API promises of issue 12: reductions on every loss, labels that are used, exact edge
numerics (-inf logits, SKD near zero), CWD's normaliser and module options (the package's
layering, names and argument checks: test_api_surface.py)."""
import pytest
import torch
import torch.nn.functional as F

import idd_ops
from idd_ops import reference
from conftest import gradcheck, make_feats, make_labels

# name -> (call(module, s, t, y, reduction), expected "none" shape for s [B, C, H, W] = [2, 5, 6, 7])
LOSSES = {
    "pixel_kd": (lambda m, s, t, y, r: m.pixel_kd_loss(s, t, temperature=2.0, reduction=r), (2, 6, 7)),
    "pixel_kd_labels": (lambda m, s, t, y, r: m.pixel_kd_loss(s, t, y, reduction=r), (2, 6, 7)),
    "cwd": (lambda m, s, t, y, r: m.channel_wise_distillation_loss(s, t, reduction=r), (2, 5)),
    "skd": (lambda m, s, t, y, r: m.structural_kd_loss(s, torch.cat([t, t[:, :2]], 1), reduction=r), (2,)),
    "skd_pool1": (lambda m, s, t, y, r: m.structural_kd_loss(s, t, pool=1, reduction=r), (2,)),
    "ifvd": (lambda m, s, t, y, r: m.intra_class_variation_loss(s, t, y, 4, reduction=r), (2, 6, 7)),
}


def _inputs(device):
    s = make_feats(2, 5, 6, 7, device=device, seed=1).requires_grad_()
    t = make_feats(2, 5, 6, 7, device=device, seed=2)
    y = make_labels(2, 12, 14, 4, device=device, ignore_frac=0.3)
    return s, t, y


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_every_loss_reduces_like_its_reference(device, name, reduction):
    fn, shape = LOSSES[name]
    s, t, y = _inputs(device)
    la, lb = fn(idd_ops, s, t, y, reduction), fn(reference, s, t, y, reduction)
    assert la.shape == (shape if reduction == "none" else ())
    w = torch.randn_like(la)
    (ga,) = torch.autograd.grad((la * w).sum(), s)
    (gb,) = torch.autograd.grad((lb * w).sum(), s)
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_reductions_agree_with_each_other(name):
    fn, _ = LOSSES[name]
    s, t, y = _inputs("cpu")
    mean, total, each = (fn(idd_ops, s, t, y, r) for r in ("mean", "sum", "none"))
    if name == "pixel_kd_labels":  # the mean is over the kept pixels
        count = (reference.resize_labels(y, (6, 7)) != 255).sum()
    elif name.startswith("skd"):  # "none" holds per-image means over P*P entries
        P = 6 * 7 if name == "skd_pool1" else 3 * 4
        count = each.numel() * P * P
    else:
        count = each.numel()
    torch.testing.assert_close(total, each.sum() * (count / each.numel() if name.startswith("skd") else 1))
    torch.testing.assert_close(mean, total / count)


@pytest.mark.parametrize("name", ["pixel_kd_labels", "cwd", "skd"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_gradcheck(name, reduction):
    fn, _ = LOSSES[name]
    s, t = make_feats(2, 3, 4, 3, seed=1).requires_grad_(), make_feats(2, 3, 4, 3, seed=2)
    y = make_labels(2, 8, 6, 3, ignore_frac=0.3)  # classes in [0, 3): pixel KD's logits have 3
    assert gradcheck(lambda x: fn(idd_ops, x, t, y, reduction), (s,))


def test_pixel_kd_uses_labels_with_ignore_index_255_by_default():
    s, t, y = _inputs("cpu")
    masked = idd_ops.pixel_kd_loss(s, t, labels=y)
    assert not torch.allclose(masked, idd_ops.pixel_kd_loss(s, t))
    kl = reference.pixel_kd_loss(s, t, reduction="none")  # per pixel, nothing masked
    keep = reference.resize_labels(y, (6, 7)) != 255
    torch.testing.assert_close(masked, kl[keep].mean())
    torch.testing.assert_close(idd_ops.nn.PixelKDLoss()(s, t, y), masked)


@pytest.mark.parametrize("size", [(22, 22), (33, 46), (5, 3)])
def test_pixel_kd_mask_follows_the_kernels_label_resize(size):
    """Odd ratios (26 -> 22 rows: F.interpolate's float32 scale rounds 11 * 26/22 down to 12):
    the fused mask, the reference and the centroid kernel must pick the same labels."""
    K = 3
    y = torch.randint(0, K, (1, 26, 39))
    y[:, ::3] = 255
    s = make_feats(1, K, *size, seed=1)
    t = make_feats(1, K, *size, seed=2)
    torch.testing.assert_close(idd_ops.pixel_kd_loss(s, t, y), reference.pixel_kd_loss(s, t, y))
    _, counts = idd_ops.class_centroids(torch.zeros(1, 1, *size, dtype=torch.float64), y, K)
    want = torch.stack([(reference.resize_labels(y, size) == k).sum() for k in range(K)])
    assert torch.equal(counts[0], want)


def _masked_teacher(device, dtype, dim):
    s = make_feats(2, 5, 3, 4, device=device, dtype=dtype, seed=1).requires_grad_()
    t = make_feats(2, 5, 3, 4, device=device, dtype=dtype, seed=2)
    index = [slice(None)] * 4
    index[dim] = slice(1, 3)  # classes (dim 1) or pixels (dim 2) masked out by the teacher
    t[tuple(index)] = float("-inf")
    return s, t


def _kl_exact(s, t, T, dim):
    """Float64 KL with the 0 * log 0 = 0 convention, written independently of either implementation."""
    s, t = s.double() / T, t.double() / T
    pt = F.softmax(t, dim)
    return torch.xlogy(pt, pt).sum(dim) - (pt * F.log_softmax(s, dim)).sum(dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_minus_inf_teacher_logits_give_the_exact_finite_kd(device, dtype):
    s, t = _masked_teacher(device, dtype, 1)
    for module in (idd_ops, reference):
        loss = module.pixel_kd_loss(s, t, temperature=2.0)
        (grad,) = torch.autograd.grad(loss, s)
        want = _kl_exact(s, t, 2.0, 1).mean() * 4
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        (want_grad,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_minus_inf_teacher_features_give_the_exact_finite_cwd(device, dtype):
    s, t = _masked_teacher(device, dtype, 2)
    for module in (idd_ops, reference):
        loss = module.channel_wise_distillation_loss(s, t)
        (grad,) = torch.autograd.grad(loss, s)
        B, C = s.shape[:2]
        want = _kl_exact(s.flatten(2), t.flatten(2), 4.0, 2).sum() / (B * C) * 16
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        (want_grad,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=1e-6)


def _no_mass_case(device, dtype, kd):
    """Pixel KD ([B, K, H, W], vectors over dim 1) or CWD (rows over H*W) with one teacher vector
    that is -inf everywhere, once with a finite student there and once masked the same way."""
    s = make_feats(2, 5, 3, 4, device=device, dtype=dtype, seed=1)
    t = make_feats(2, 5, 3, 4, device=device, dtype=dtype, seed=2)
    where = (0, slice(None), 1, 2) if kd else (1, 3)  # the class vector of one pixel / one channel
    t[where] = float("-inf")
    s_masked = s.clone()
    s_masked[where] = float("-inf")
    return s, s_masked, t, where


def _kd_or_cwd(module, kd, s, t):
    """(loss, d loss / d s) of pixel KD at T=2 or CWD at T=4."""
    s = s.clone().requires_grad_()
    loss = module.pixel_kd_loss(s, t, temperature=2.0) if kd else module.channel_wise_distillation_loss(s, t)
    return loss, torch.autograd.grad(loss, s)[0]


@pytest.mark.parametrize("kd", [True, False], ids=["pixel_kd", "cwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_teacher_vector_without_mass_adds_zero(device, dtype, kd):
    """METHOD.md "-inf logits": the vector adds 0 with zero gradient and still counts in the mean."""
    finite, masked, t, where = _no_mass_case(device, dtype, kd)
    for student in (finite, masked):
        if kd:
            kl = _kl_exact(student.movedim(1, -1), t.movedim(1, -1), 2.0, -1)  # [B, H, W]
        else:
            kl = _kl_exact(student.flatten(2), t.flatten(2), 4.0, 2)  # [B, C]
        kl[where[:1] + where[2:] if kd else where] = 0  # the vector's NaN from 0/0 -> its defined 0
        want = kl.mean() * (4 if kd else 16)
        for module in (idd_ops, reference):
            loss, grad = _kd_or_cwd(module, kd, student, t)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), module.__name__
            torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
            assert torch.equal(grad[where], torch.zeros_like(grad[where]))


@pytest.mark.parametrize("kd", [True, False], ids=["pixel_kd", "cwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_student_minus_inf_where_the_teacher_has_mass_is_infinite(device, dtype, kd):
    """One -inf student entry: +inf, gradient (p_s - p_t) / T elsewhere finite; a student vector
    all -inf: +inf with zero gradient on it. Fused and reference agree on the gradient."""
    s, s_masked, _, where = _no_mass_case(device, dtype, kd)
    t = make_feats(2, 5, 3, 4, device=device, dtype=dtype, seed=2)  # every vector with mass
    one = s.clone()
    one[(0, 2, 1, 2) if kd else (1, 3, 0, 0)] = float("-inf")
    for student, vector_zero in ((one, False), (s_masked, True)):
        grads = []
        for module in (idd_ops, reference):
            loss, grad = _kd_or_cwd(module, kd, student, t)
            assert loss.item() == float("inf") and torch.isfinite(grad).all(), module.__name__
            if vector_zero:
                assert torch.equal(grad[where], torch.zeros_like(grad[where]))
            grads.append(grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kd", [True, False], ids=["pixel_kd", "cwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [90.0, 800.0])
def test_student_minus_inf_under_a_tiny_teacher_probability_is_infinite(device, dtype, kd, gap):
    """A teacher entry gap * T below its vector's maximum has p_t of exp(-gap): a float32
    subnormal at 90 (the CPU's vectorised exp flushed it to 0, so the KL came out finite), 0 in
    every float at 800. It is > 0 all the same, and a student -inf there gives +inf (METHOD.md
    "-inf logits"), fused and reference, with the same finite gradient."""
    s, _, _, _ = _no_mass_case(device, dtype, kd)
    t = make_feats(2, 5, 3, 4, device=device, dtype=dtype, seed=2)
    T = 2.0 if kd else 4.0
    at = (0, 2, 1, 2) if kd else (1, 3, 0, 0)
    vector = t[0, :, 1, 2] if kd else t[1, 3]  # the class vector of one pixel / one channel
    t[at] = vector.max() - gap * T
    s[at] = float("-inf")
    grads = []
    for module in (idd_ops, reference):
        loss, grad = _kd_or_cwd(module, kd, s, t)
        assert loss.item() == float("inf") and torch.isfinite(grad).all(), module.__name__
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kd", [True, False], ids=["pixel_kd", "cwd"])
@pytest.mark.parametrize("case", ["teacher all nan", "teacher nan and -inf", "teacher one nan",
                                  "student all nan", "student nan, teacher -inf", "student -inf, teacher one nan"])
def test_a_nan_logit_makes_its_vector_nan_in_value_and_gradient(device, kd, case):
    """METHOD.md "-inf logits": a NaN is never read as a mask. An all-NaN teacher vector once gave
    loss 0 and a NaN gradient; now loss and gradient are NaN on the vector, as in the reference,
    and the other vectors keep finite gradients. A student vector of -inf only (whose +inf
    carries no gradient) beside a teacher NaN: NaN too (the reference once gave a zero gradient
    there)."""
    s, _, t, where = _no_mass_case(device, torch.float32, kd)
    t = make_feats(2, 5, 3, 4, device=device, dtype=torch.float32, seed=2)
    side = t if case.startswith("teacher") else s
    vector = side[where]
    if case in ("teacher all nan", "student all nan"):
        vector.fill_(float("nan"))
    elif case == "teacher nan and -inf":
        vector.fill_(float("-inf"))
        vector[..., 0] = float("nan")
    elif case == "teacher one nan":
        vector[..., 1] = float("nan")
    elif case == "student -inf, teacher one nan":  # the student's all -inf branch passes no gradient
        vector.fill_(float("-inf"))
        t[where] = torch.where(torch.arange(t[where].shape[-1], device=device) == 1, float("nan"), t[where])
    else:
        t[where] = float("-inf")
        vector[..., 2] = float("nan")
    side[where] = vector
    for module in (idd_ops, reference):
        loss, grad = _kd_or_cwd(module, kd, s, t)
        assert torch.isnan(loss), module.__name__
        assert torch.isnan(grad[where]).all(), module.__name__
        rest = torch.ones_like(grad, dtype=torch.bool)
        rest[where] = False
        assert torch.isfinite(grad[rest]).all(), module.__name__


def _empty_case(name, shape, device):
    """(call(module, x, reduction), x) of one loss on features with a zero-size dimension."""
    B, C, H, W = shape
    y = torch.zeros(B, H, W, dtype=torch.long, device=device)
    t = torch.zeros(B, C, H, W, device=device)
    calls = {
        "idd": lambda m, x, r: m.inter_class_distance_loss(x, t, y, 5, reduction=r),
        "ifvd": lambda m, x, r: m.intra_class_variation_loss(x, t, y, 5, reduction=r),
        "pixel_kd": lambda m, x, r: m.pixel_kd_loss(x, t, y, reduction=r),
        "cwd": lambda m, x, r: m.channel_wise_distillation_loss(x, t, reduction=r),
        "skd": lambda m, x, r: m.structural_kd_loss(x, t, reduction=r),
        "position": lambda m, x, r: m.position_encoding_loss(x[:, :1], ["horizontal"], reduction=r),
    }
    return calls[name], torch.zeros(shape, device=device)


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)], ids=["B=0", "H=0", "W=0"])
@pytest.mark.parametrize("name", ["idd", "ifvd", "pixel_kd", "cwd", "skd", "position"])
def test_an_empty_input_gives_the_references_finite_result(device, name, shape):
    """API.md: an empty batch or map gives a finite, documented result: 0 for "mean" and "sum"
    (never 0/0), the empty or zero per-item values for "none"; the reference agrees, and the
    backward runs. (IFVD and the position loss once gave NaN, the fused position loss with
    "none" crashed, and the reference raised on several.)"""
    call, x = _empty_case(name, shape, device)
    if name == "position" and shape[3] == 0:  # a horizontal map divides by W - 1: a clear error
        with pytest.raises(ValueError, match="needs height and width >= 2 where it varies"):
            call(idd_ops, x, "mean")
        return
    for reduction in ("mean", "sum", "none"):
        xs = x.clone().requires_grad_()
        got = call(idd_ops, xs, reduction)
        want = call(reference, x, reduction)
        assert got.shape == want.shape and torch.isfinite(got).all(), reduction
        torch.testing.assert_close(got, want)
        if reduction != "none":
            assert got.item() == 0
        got.sum().backward()
        assert xs.grad is None or (xs.grad.shape == xs.shape and torch.isfinite(xs.grad).all())


@pytest.mark.parametrize("name", ["idd", "ifvd"])
def test_an_empty_map_with_labels_agrees_with_the_reference(name):
    """Labels of a real size over an empty feature map: the reference's F.interpolate raised
    ("sizes should be greater than 0") where the fused op gives 0."""
    fn = {"idd": "inter_class_distance_loss", "ifvd": "intra_class_variation_loss"}[name]
    s, t, y = torch.randn(2, 3, 0, 4), torch.randn(2, 5, 0, 4), torch.randint(0, 3, (2, 4, 4))
    got, want = getattr(idd_ops, fn)(s, t, y, 3), getattr(reference, fn)(s, t, y, 3)
    assert got.item() == 0 and want.item() == 0


def test_modules_show_their_options():
    for module, text in [(idd_ops.nn.PixelKDLoss(2.0), "temperature=2.0, ignore_index=255, reduction='mean'"),
                         (idd_ops.nn.StructuralKDLoss(pool=1), "pool=1, reduction='mean'"),
                         (idd_ops.nn.IntraClassVariationLoss(19), "num_classes=19, ignore_index=255, eps=1e-08"),
                         (idd_ops.nn.InterClassDistanceLoss(19, eps=1e-6), "eps=1e-06, centroids='image'"),
                         (idd_ops.nn.PositionEncodingModule(4, "gaussian", sigma=0.5), "kinds=('gaussian',), "
                          "num_frequencies=2, num_stripes=4, sigma=0.5"),
                         (idd_ops.nn.PositionDistillationLoss(None, 4, variant="target", kinds="vertical"),
                          "variant='target', reduction='mean', kinds=('vertical',)")]:
        assert text in repr(module), repr(module)


def test_an_empty_batch_gives_zero_position_distillation(device):
    readout = idd_ops.nn.PositionEncodingModule(6, ["horizontal"], hidden=8)
    pid = idd_ops.nn.PositionDistillationLoss(readout, 4).to(device)
    loss = pid(torch.randn(0, 4, 8, 8, device=device), torch.randn(0, 6, 8, 8, device=device))
    assert loss.item() == 0


@pytest.mark.parametrize("extra_channels,pool", [(0, 1), (3, 1), (0, 4), (3, 4)])
@pytest.mark.parametrize("student_scale", [1.0, 1e-4, 1e4])
def test_skd_value_accurate_in_float32_near_zero(device, extra_channels, pool, student_scale):
    """The differenced form, with equal channel counts and with a teacher padded by extra
    all-zero channels (the same affinity: the student side is zero-padded inside the op); and
    with the student's features at another scale than the teacher's, which SKD's normalisation
    removes. There S - T is not small and D forms from terms of size 1, so every formulation
    forms the norms and D in float64 (1.4e-5 relative here, a float32 reference 8e-4 at pool 4;
    the batched one and the CUDA kernels took them in float32: 9e-4 and 1.4e-3). The batched
    formulation once divided by the student's norm: 0.1 off at 1e-4."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 32, 16, 16, generator=g, dtype=torch.float64)
    s = student_scale * (t + 1e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    t = torch.cat([t, t.new_zeros(2, extra_channels, 16, 16)], 1)
    want = reference.structural_kd_loss(s, t, pool=pool)  # float64, through the P x P affinity
    got = idd_ops.structural_kd_loss(s.float().to(device), t.float().to(device), pool=pool)
    # a float32 reference gets 6e-7 at pool 1 and 4e-4 at pool 4 (its normalised features are
    # rounded before they are differenced); the three plain Gram norms in float32 gave 8e-3
    assert abs(got.double().cpu() / want - 1) < (1e-5 if student_scale == 1 else 1e-4)


def test_cwd_adapter_normaliser():
    torch.manual_seed(0)
    s = make_feats(2, 4, 5, 6, dtype=torch.float32, seed=1)
    t = make_feats(2, 6, 5, 6, dtype=torch.float32, seed=2)
    cirkd = idd_ops.nn.ChannelWiseDistillationLoss(4, 6)
    per_teacher = idd_ops.nn.ChannelWiseDistillationLoss(4, 6, normalizer="teacher_channels")
    per_teacher.load_state_dict(cirkd.state_dict())
    adapted = cirkd.adapter(s)
    # CIRKD: KL summed over every (image, channel), divided by the batch size times the
    # student's channel count read before the adapter, times T^2
    ps = F.log_softmax(adapted.flatten(2) / 4.0, -1)
    pt = F.softmax(t.flatten(2) / 4.0, -1)
    cirkd_value = (pt * (pt.log() - ps)).sum() / (2 * 4) * 16
    torch.testing.assert_close(cirkd(s, t), cirkd_value)
    torch.testing.assert_close(per_teacher(s, t), cirkd_value * 4 / 6)
    torch.testing.assert_close(per_teacher(s, t), idd_ops.channel_wise_distillation_loss(adapted, t))
    with pytest.raises(ValueError, match="normalizer"):
        idd_ops.nn.ChannelWiseDistillationLoss(4, 6, normalizer="pixels")


def test_modules_expose_their_functions_options():
    s, t, y = _inputs("cpu")
    module = idd_ops.nn.InterClassDistanceLoss(4, centroids="batch")
    torch.testing.assert_close(module(s, t, y), idd_ops.inter_class_distance_loss(s, t, y, 4, centroids="batch"))
    for cls, fn in [(idd_ops.nn.StructuralKDLoss, lambda: idd_ops.structural_kd_loss(s, t, reduction="none")),
                    (idd_ops.nn.IntraClassVariationLoss, lambda: idd_ops.intra_class_variation_loss(
                        s, t, y, 4, reduction="none"))]:
        m = cls(reduction="none") if cls is idd_ops.nn.StructuralKDLoss else cls(4, reduction="none")
        args = (s, t) if cls is idd_ops.nn.StructuralKDLoss else (s, t, y)
        torch.testing.assert_close(m(*args), fn())
    feats = [torch.randn(2, 4, 6, 8) for _ in range(2)]
    readout, _ = idd_ops.probe_position_information(lambda x: x, feats, ["horizontal_stripes", "gaussian"], steps=2,
                                                    hidden=4, num_stripes=3, sigma=0.5, progress=False)
    assert readout.map_options() == {"num_frequencies": 2, "num_stripes": 3, "sigma": 0.5}
    pid = idd_ops.nn.PositionDistillationLoss(readout, 4, variant="target", hidden=4, reduction="sum")
    pred = pid.readout(feats[0])
    torch.testing.assert_close(pid(feats[0]), idd_ops.position_encoding_loss(
        pred, ["horizontal_stripes", "gaussian"], reduction="sum", num_stripes=3, sigma=0.5))


def test_reference_has_batch_centroids():
    s, t, y = _inputs("cpu")
    for reduction in ("mean", "none"):
        torch.testing.assert_close(
            idd_ops.inter_class_distance_loss(s, t, y, 4, centroids="batch", reduction=reduction),
            reference.inter_class_distance_loss(s, t, y, 4, centroids="batch", reduction=reduction))
