"""Pixel KD, CWD, SKD and IFVD against their references, plus the properties each promises."""
import pytest
import torch

import idd_ops
from idd_ops import reference
from conftest import TOLERANCES, gradcheck, make_feats, make_labels

LOSSES = ["pixel_kd_loss", "pixel_kd_loss_ignore", "channel_wise_distillation_loss", "structural_kd_loss",
          "structural_kd_loss_pool1", "intra_class_variation_loss"]


def call(name, module, s, t, y):
    """Each loss at options that exercise it; SKD and IFVD get a teacher with more channels."""
    t_wide = torch.cat([t, t[:, :2] * 0.5], 1)
    return {
        "pixel_kd_loss": lambda: module.pixel_kd_loss(s, t, temperature=2.0),
        "pixel_kd_loss_ignore": lambda: module.pixel_kd_loss(s, t, y, temperature=1.0),
        "channel_wise_distillation_loss": lambda: module.channel_wise_distillation_loss(s, t, 4.0),
        "structural_kd_loss": lambda: module.structural_kd_loss(s, t_wide, 2),
        "structural_kd_loss_pool1": lambda: module.structural_kd_loss(s, t_wide, 1),
        "intra_class_variation_loss": lambda: module.intra_class_variation_loss(s, t_wide, y, 4),
    }[name]()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("size", [(7, 9), (16, 33), (1, 1)])
def test_matches_reference(device, name, size):
    s = make_feats(2, 5, *size, device=device, seed=1).requires_grad_()
    t = make_feats(2, 5, *size, device=device, seed=2)
    y = make_labels(2, 2 * size[0], 2 * size[1], 4, device=device)
    la = call(name, idd_ops, s, t, y)
    (ga,) = torch.autograd.grad(la, s)
    lb = call(name, reference, s, t, y)
    (gb,) = torch.autograd.grad(lb, s)
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(device, name):
    s = make_feats(2, 4, 5, 6, device=device, seed=1).requires_grad_()
    t = make_feats(2, 4, 5, 6, device=device, seed=2)
    y = make_labels(2, 10, 12, 4, device=device)
    assert gradcheck(lambda x: call(name, idd_ops, x, t, y), (s,))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_forward(device, name, dtype, layout):
    kw = dict(device=device, dtype=dtype, channels_last=layout == "channels_last")
    s, t = make_feats(2, 8, 12, 10, seed=1, **kw), make_feats(2, 8, 12, 10, seed=2, **kw)
    y = make_labels(2, 24, 20, 4, device=device)
    got = call(name, idd_ops, s, t, y)
    want = call(name, reference, s.double(), t.double(), y)
    tol = TOLERANCES[dtype]
    assert got.dtype == dtype
    # atol relative to the value too: a loss of 0.04 was within an absolute 5e-2 of 0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("name", LOSSES)
def test_a_float32_teacher_with_a_float64_student(device, name):
    """Mixed dtypes: the loss and the student's gradient equal those with the teacher's float32
    values given as float64 (within the teacher side's float32 arithmetic). IFVD's backward once
    failed on torch 2.4 ("Found dtype Float but expected Double")."""
    s = make_feats(2, 5, 7, 9, device=device, seed=1).requires_grad_()
    t = make_feats(2, 5, 7, 9, device=device, seed=2).float()
    y = make_labels(2, 14, 18, 4, device=device)
    la = call(name, idd_ops, s, t, y)
    (ga,) = torch.autograd.grad(la, s)
    lb = call(name, idd_ops, s, t.double(), y)
    (gb,) = torch.autograd.grad(lb, s)
    assert la.dtype == ga.dtype == torch.float64
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", LOSSES)
def test_compiled(device, name):
    torch._dynamo.reset()
    s = make_feats(2, 4, 8, 8, dtype=torch.float32, device=device).requires_grad_()
    t = make_feats(2, 4, 8, 8, dtype=torch.float32, device=device, seed=2)
    y = make_labels(2, 16, 16, 4, device=device)
    fn = torch.compile(lambda a, b, c: call(name, idd_ops, a, b, c), fullgraph=True)
    torch.testing.assert_close(fn(s, t, y), call(name, idd_ops, s, t, y))


def test_teacher_gets_no_gradient():
    s = make_feats(2, 4, 6, 6).requires_grad_()
    t = make_feats(2, 4, 6, 6, seed=2).requires_grad_()
    y = make_labels(2, 6, 6, 4)
    for name in LOSSES:
        call(name, idd_ops, s, t, y).backward()
    assert t.grad is None and s.grad is not None


def test_skd_never_forms_the_pixel_affinity():
    """pool=1 on 256x512 features: a P x P affinity would need 68 GB (more than this machine has);
    the Gram route needs C x C."""
    s = torch.randn(1, 8, 256, 512, requires_grad=True)
    t = torch.randn(1, 8, 256, 512)
    loss = idd_ops.structural_kd_loss(s, t, pool=1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # the identity holds: equal inputs give zero
    assert idd_ops.structural_kd_loss(t, t, pool=1).item() == pytest.approx(0, abs=1e-6)


def test_ifvd_ignored_pixels_score_one():
    s = make_feats(1, 3, 4, 4)
    y = torch.full((1, 4, 4), 255)
    cos, _ = torch.ops.idd_ops.pixel_centroid_cosine(s, torch.zeros(1, 2, 3, dtype=torch.float64), y, 255, 1e-8)
    assert torch.equal(cos, torch.ones_like(cos))
    assert idd_ops.intra_class_variation_loss(s, make_feats(1, 5, 4, 4), y, 2).item() == 0


def test_modules():
    s = make_feats(2, 4, 8, 8, dtype=torch.float32).requires_grad_()
    t = make_feats(2, 6, 8, 8, dtype=torch.float32, seed=2)
    y = make_labels(2, 8, 8, 4)
    cwd = idd_ops.nn.ChannelWiseDistillationLoss(4, 6)
    cwd(s, t).backward()
    assert cwd.adapter.weight.grad is not None
    # each module passes its options on: equal to the function with them, and they change the value
    y1 = torch.where(y == 255, torch.zeros_like(y), y)  # no 255 where ignore_index is 1
    for pool in (2, 4):
        torch.testing.assert_close(idd_ops.nn.StructuralKDLoss(pool=pool, reduction="none")(s, t),
                                   idd_ops.structural_kd_loss(s, t, pool=pool, reduction="none"))
    assert idd_ops.nn.StructuralKDLoss(pool=2)(s, t) != idd_ops.nn.StructuralKDLoss(pool=4)(s, t)
    torch.testing.assert_close(idd_ops.nn.IntraClassVariationLoss(4, ignore_index=1)(s, t, y1),
                               idd_ops.intra_class_variation_loss(s, t, y1, 4, ignore_index=1))
    assert idd_ops.nn.IntraClassVariationLoss(4)(s, t, y) > 0
    torch.testing.assert_close(idd_ops.nn.PixelKDLoss(2.0)(s, s * 2), idd_ops.pixel_kd_loss(s, s * 2, temperature=2.0))
    for ignore in (1, 255):
        torch.testing.assert_close(idd_ops.nn.PixelKDLoss(2.0, ignore_index=ignore, reduction="sum")(s, s * 2, y1),
                                   idd_ops.pixel_kd_loss(s, s * 2, y1, temperature=2.0, ignore_index=ignore,
                                                         reduction="sum"))
    assert idd_ops.nn.PixelKDLoss(ignore_index=1)(s, s * 2, y1) != idd_ops.nn.PixelKDLoss()(s, s * 2, y1)
    assert cwd.adapter(s).shape == (2, 6, 8, 8)
    assert idd_ops.nn.ChannelWiseDistillationLoss(4, 6, reduction="none")(s, t).shape == (2, 6)


@pytest.mark.parametrize("build,error,text", [
    (lambda: idd_ops.nn.InterClassDistanceLoss(5.0), TypeError, "num_classes: expected an int"),
    (lambda: idd_ops.nn.InterClassDistanceLoss(5, metric="l1"), ValueError, "metric: expected one of"),
    (lambda: idd_ops.nn.InterClassDistanceLoss(5, centroids="global"), ValueError, "centroids: expected one of"),
    (lambda: idd_ops.nn.PixelKDLoss(temperature=-1), ValueError, "temperature: expected a finite value > 0"),
    (lambda: idd_ops.nn.PixelKDLoss(reduction="avg"), ValueError, "reduction: expected one of"),
    (lambda: idd_ops.nn.StructuralKDLoss(pool=0), ValueError, "pool: expected an int >= 1"),
    (lambda: idd_ops.nn.IntraClassVariationLoss(num_classes=0), ValueError, "num_classes: expected an int >= 1"),
    (lambda: idd_ops.nn.IntraClassVariationLoss(4, eps=0), ValueError, "eps: expected a finite value > 0"),
    (lambda: idd_ops.nn.ChannelWiseDistillationLoss(4, 6, temperature=0), ValueError, "temperature"),
    (lambda: idd_ops.nn.PositionDistillationLoss(None, 4, variant="target"), ValueError, "kinds: the 'target' variant"),
])
def test_modules_check_their_options_when_built(build, error, text):
    """A bad option fails where the module is built, naming it, not at the first forward (or as
    an AttributeError)."""
    with pytest.raises(error, match=text):
        build()


def test_opcheck(device):
    s = torch.randn(2, 5, 7, device=device, requires_grad=True)
    t = torch.randn(2, 5, 7, device=device)
    torch.library.opcheck(torch.ops.idd_ops.softmax_kl.default, (s, t, 2.0))
    torch.library.opcheck(torch.ops.idd_ops.softmax_kl.default, (s.reshape(10, 7, 1), t.reshape(10, 7, 1), 2.0))
    for pool in (1, 2):
        torch.library.opcheck(torch.ops.idd_ops.affinity_loss.default,
                              (s.reshape(2, 5, 7, 1), torch.randn(2, 3, 7, 1, device=device), pool))
    f = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    c = torch.randn(2, 4, 3, device=device, requires_grad=True)
    y = make_labels(2, 4, 5, 4, device=device)
    torch.library.opcheck(torch.ops.idd_ops.pixel_centroid_cosine.default, (f, c, y, 255, 1e-8))


@pytest.mark.parametrize("call_,text", [
    (lambda: idd_ops.pixel_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4)), "teacher_logits: shape"),
    (lambda: idd_ops.channel_wise_distillation_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4)), "1x1 conv"),
    (lambda: idd_ops.pixel_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), temperature=0.0), "temperature"),
    (lambda: idd_ops.pixel_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), temperature=1e-300),
     "temperature: .*finite float32"),
    (lambda: idd_ops.channel_wise_distillation_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4),
                                                    temperature=1e-39), "temperature: .*finite float32"),
    (lambda: idd_ops.structural_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)), "spatial size"),
    (lambda: idd_ops.structural_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), pool=0), "pool"),
    (lambda: idd_ops.structural_kd_loss(torch.randn(1, 0, 4, 4), torch.randn(1, 3, 4, 4), pool=1), "student_feats: .*channel"),
    (lambda: idd_ops.structural_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 0, 4, 4)), "teacher_feats: .*channel"),
    (lambda: idd_ops.intra_class_variation_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2),
                                                torch.zeros(1, 4, 4, dtype=torch.long), 2), "spatial size"),
    (lambda: idd_ops.intra_class_variation_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4),
                                                torch.full((1, 4, 4), 5), 2), "labels: value 5"),
    (lambda: idd_ops.pixel_kd_loss(torch.randn(1, 3, 4), torch.randn(1, 3, 4)), "student_logits"),
    (lambda: idd_ops.pixel_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.full((1, 8, 8), 3)),
     "labels: value 3"),
])
def test_bad_input(call_, text):
    with pytest.raises((ValueError, TypeError), match=text):
        call_()


def _pixel_kd_both_masks(monkeypatch, K, y, ignore_index=255):
    """Pixel KD's kept pixels from the class-slot map (the CPU and CUDA) and from the ATen mask
    (other devices, and past MAX_SLOT_CLASSES): each gives the reference's loss and gradient."""
    from idd_ops import _switches
    s = make_feats(2, K, 6, 7, seed=1).requires_grad_()
    t = make_feats(2, K, 6, 7, seed=2)
    ref = reference.pixel_kd_loss(s, t, y, temperature=2.0, ignore_index=ignore_index)
    (ref_grad,) = torch.autograd.grad(ref, s)
    for slots in (True, False):
        monkeypatch.setattr(_switches, "slot_map_path", lambda device, on=slots: on)
        loss = idd_ops.pixel_kd_loss(s, t, y, temperature=2.0, ignore_index=ignore_index)
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss, s)[0], ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("label_size", [(6, 7), (13, 22), (3, 4)], ids=["same", "larger", "smaller"])
def test_pixel_kd_masks_agree(monkeypatch, label_size):
    _pixel_kd_both_masks(monkeypatch, 5, make_labels(2, *label_size, 5, ignore_frac=0.3))


def test_pixel_kd_masks_with_an_ignore_index_outside_the_label_dtype(monkeypatch):
    """uint8 labels hold every class of K = 256, 255 among them, and ignore_index = -1 marks
    none: comparing in uint8 would wrap -1 to 255 and drop that class's pixels."""
    y = make_labels(2, 13, 22, 256, ignore_frac=0.0).to(torch.uint8)
    y[:, :3] = 255
    _pixel_kd_both_masks(monkeypatch, 256, y, ignore_index=-1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pixel_kd_over_no_classes_with_labels(device, reduction):
    """Logits of 0 classes, every label ignored: 0, as without labels and in the reference (the
    slot map, which takes at least one class, once raised "num_classes: ... got 0")."""
    x = torch.zeros(2, 0, 7, 5, device=device)
    y = torch.full((2, 7, 5), 255, device=device)
    got = idd_ops.pixel_kd_loss(x, x, y, reduction=reduction)
    torch.testing.assert_close(got, reference.pixel_kd_loss(x, x, y, reduction=reduction))
    assert not got.any()


def test_pixel_kd_and_cwd_check_devices():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="teacher_logits: on meta"):
        idd_ops.pixel_kd_loss(x, x.to("meta"))
    with pytest.raises(ValueError, match="teacher_feats: on meta"):
        idd_ops.channel_wise_distillation_loss(x, x.to("meta"))


@pytest.mark.parametrize("pool", [2, 3])
def test_skd_pooling_ties_route_the_gradient_as_max_pool2d(device, pool):
    """ReLU-like features tie within pooling windows: the gradient goes to each window's first
    maximum in row-major order, as torch's max_pool2d routes it; odd sizes leave partial windows."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 7, 11, generator=g, dtype=torch.float64).clamp_min(0.5).to(device).requires_grad_()
    t = torch.randn(2, 4, 7, 11, generator=g, dtype=torch.float64).to(device)
    (got,) = torch.autograd.grad(idd_ops.structural_kd_loss(s, t, pool=pool), s)
    (want,) = torch.autograd.grad(reference.structural_kd_loss(s, t, pool=pool), s)
    assert (s == 0.5).float().mean() > 0.3  # many ties
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
