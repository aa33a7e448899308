"""_ifvd_maps, IFVD's two cosine maps in one op from both networks' class sums, and _ifvd_loss,
the maps and their mse in one op (the ATen formulations here, which make the calls they replace,
so their equalities below hold their wiring, not new arithmetic; their CUDA kernels in
test_cuda_emulated_ifvd_maps.py): the same values and gradient as the calls they replace, their
gradients against finite differences, their fake kernels, constants that require grad (their
argument checks: test_op_args.py), and IFVD through them."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import idd_ops
from idd_ops import _switches
from idd_ops._class_sums import detached_centroids, pair_sums, slots_for
from labels import CASES

ops = torch.ops.idd_ops
CASE_IDS = ("mixed-warps-resized", "absent-classes", "all-ignored", "clamped-cosine", "odd-sizes")


def inputs(case, dtype=torch.float64, teacher_channels=11):
    """(student, teacher, student sums, teacher sums, counts, slots) of a label case."""
    s, t = case.feats(dtype=dtype), case.feats(C=teacher_channels, dtype=dtype, seed=1)
    slots = slots_for(case.labels(), s, case.K, case.ignore_index)
    ss, ns, st, _ = pair_sums(s, t, case.labels(), case.K, case.ignore_index, slots=slots)
    return s, t, ss, st, ns, slots


def two_calls(s, t, ss, st, ns, slots, eps=1e-8):
    """What IFVD computes without the op: centroids divided apart, a cosine call per network."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    cs, ct = detached_centroids((ss, st), ns, [acc, acc])
    return ops._pixel_centroid_cosine_slots(s, cs, slots, eps, ns), ops._pixel_centroid_cosine_slots(t, ct, slots, eps)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in CASE_IDS], ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_two_cosine_calls_it_replaces(case, dtype):
    s, t, ss, st, ns, slots = inputs(case, dtype)
    s.requires_grad_()
    cos_s, cos_t, fnorm_s, cent_s = ops._ifvd_maps(s, t, ss, st, ns, slots, 1e-8)
    (want_s, want_fnorm), (want_t, _) = two_calls(s, t, ss, st, ns, slots)
    for got, want in ((cos_s, want_s), (cos_t, want_t), (fnorm_s, want_fnorm)):
        assert torch.equal(got, want)
    assert torch.equal(cent_s, detached_centroids((ss,), ns, [cos_s.dtype])[0])
    assert cos_s.requires_grad and not (cos_t.requires_grad or fnorm_s.requires_grad or cent_s.requires_grad)
    grad = torch.rand(cos_s.shape, dtype=cos_s.dtype, generator=torch.Generator().manual_seed(3))
    got_grad, = torch.autograd.grad(cos_s, s, grad)
    want_grad, = torch.autograd.grad(want_s, s, grad)
    assert torch.equal(got_grad, want_grad)


def test_gradient_through_the_features_and_their_centroids():
    """The sums follow the student here (formed from it at every evaluation), so finite
    differences see the path through its centroids, which the op's backward takes inside."""
    case = next(c for c in CASES if c.id == "mixed-warps-resized")
    s, t, _, st, ns, slots = inputs(case)

    def student_map(x):
        xs = pair_sums(x.detach(), t, case.labels(), case.K, case.ignore_index, slots=slots)[0]
        return ops._ifvd_maps(x, t, xs, st, ns, slots, 1e-8)[0]
    assert torch.autograd.gradcheck(student_map, (s.requires_grad_(),))


def test_fake_kernel_and_registration():
    case = next(c for c in CASES if c.id == "absent-classes")
    s, t, ss, st, ns, slots = inputs(case, torch.float32)
    torch.library.opcheck(ops._ifvd_maps.default, (s.requires_grad_(), t, ss, st, ns, slots, 1e-8))


def test_constants_that_require_grad_are_refused():
    case = next(c for c in CASES if c.id == "mixed-warps")
    s, t, ss, st, ns, slots = inputs(case)
    with pytest.raises(RuntimeError, match="teacher input requires grad"):
        ops._ifvd_maps(s, t.requires_grad_(), ss, st, ns, slots, 1e-8)
    for i in (2, 3):  # either network's sums
        args = [s, t.detach(), ss, st, ns, slots, 1e-8]
        args[i] = args[i].clone().requires_grad_()
        with pytest.raises(ValueError, match="student_sums, teacher_sums: constants"):
            ops._ifvd_maps(*args)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in CASE_IDS], ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_loss_is_the_mse_of_the_maps(case, dtype, mean):
    """_ifvd_loss: the maps after mse_loss of them, then the student's centroids as a channel-major
    table and their norms; and mse_loss's gradient through the student's map."""
    s, t, ss, st, ns, slots = inputs(case, dtype)
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss, *maps = ops._ifvd_loss(x, t, ss, st, ns, slots, 1e-8, mean)
    want_maps = ops._ifvd_maps(y, t, ss, st, ns, slots, 1e-8)
    want = F.mse_loss(want_maps[0], want_maps[1], reduction="mean" if mean else "sum")
    assert torch.equal(loss, want) and loss.dtype == want_maps[0].dtype and loss.shape == ()
    assert len(maps) == 5 and all(torch.equal(a, b) for a, b in zip(maps[:3], want_maps[:3]))
    table, norms = maps[3:]
    assert table.is_contiguous() and torch.equal(table, want_maps[3].transpose(1, 2))
    assert norms.dtype == table.dtype and torch.equal(norms, torch.linalg.vector_norm(want_maps[3], dim=-1))
    assert loss.requires_grad and not any(m.requires_grad for m in maps)
    (loss * 3).backward()
    (want * 3).backward()
    assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_loss_gradient_through_the_features_and_their_centroids(mean):
    case = next(c for c in CASES if c.id == "mixed-warps-resized")
    s, t, _, st, ns, slots = inputs(case)

    def loss(x):
        xs = pair_sums(x.detach(), t, case.labels(), case.K, case.ignore_index, slots=slots)[0]
        return ops._ifvd_loss(x, t, xs, st, ns, slots, 1e-8, mean)[0]
    assert torch.autograd.gradcheck(loss, (s.requires_grad_(),))


def test_loss_of_no_pixels_is_zero():
    """An empty map: 0 for the mean (mse_loss's own would be 0/0) and the sum, a gradient of its
    shape."""
    s, t = torch.randn(2, 3, 0, 4, requires_grad=True), torch.randn(2, 5, 0, 4)
    slots = torch.zeros(2, 0, 4, dtype=torch.int16)
    ss, ns, st, _ = ops.class_sums_pair(s.detach(), slots, t, slots, 3)
    for mean in (True, False):
        loss = ops._ifvd_loss(s, t, ss, st, ns, slots, 1e-8, mean)[0]
        assert loss.item() == 0 and not loss.isnan()
        g, = torch.autograd.grad(loss, s)
        assert g.shape == s.shape


def test_loss_fake_kernel_and_registration():
    case = next(c for c in CASES if c.id == "absent-classes")
    s, t, ss, st, ns, slots = inputs(case, torch.float32)
    torch.library.opcheck(ops._ifvd_loss.default, (s.requires_grad_(), t, ss, st, ns, slots, 1e-8, True))


def test_loss_constants_that_require_grad_are_refused():
    case = next(c for c in CASES if c.id == "mixed-warps")
    s, t, ss, st, ns, slots = inputs(case)
    with pytest.raises(RuntimeError, match="teacher input requires grad"):
        ops._ifvd_loss(s, t.requires_grad_(), ss, st, ns, slots, 1e-8, True)
    with pytest.raises(ValueError, match="student_sums, teacher_sums: constants"):
        ops._ifvd_loss(s, t.detach(), ss.clone().requires_grad_(), st, ns, slots, 1e-8, True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ifvd_takes_the_loss_op_for_mean_and_sum(reduction):
    """With the path switch on, "mean" and "sum" take _ifvd_loss (and not _ifvd_maps), "none"
    the maps; the loss and gradient of the default path either way."""
    case = next(c for c in CASES if c.id == "mixed-warps-resized")
    s, t, y = case.feats(), case.feats(C=11, seed=1), case.labels()
    results = []
    with mock.patch.object(_switches, "class_sums_path", lambda device, channels_last=False: True):
        for on in (False, True):
            x = s.clone().requires_grad_()
            with mock.patch.object(_switches, "ifvd_maps_path", lambda device: on), \
                    mock.patch.object(ops, "_ifvd_loss", wraps=ops._ifvd_loss) as loss_op, \
                    mock.patch.object(ops, "_ifvd_maps", wraps=ops._ifvd_maps) as maps_op:
                loss = idd_ops.intra_class_variation_loss(x, t, y, case.K, reduction=reduction)
                loss.sum().backward()
            assert loss_op.called == (on and reduction != "none")
            assert maps_op.called == (on and reduction == "none")
            results.append((loss, x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_loss_on_cuda_matches_the_cpu_op(dtype, mean):
    """The CUDA kernels (the maps' launch adding the squares by tickets, the cosine backward's
    factor pass forming the gradient map) against the CPU's route, and the same bits on three calls whichever blocks come last:
    5 images of 37 x 29 pixels, 34 tiles of 32 pixels an image."""
    g = torch.Generator().manual_seed(5)
    B, K = 5, 7
    s, t = torch.randn(B, 12, 37, 29, generator=g).to(dtype), torch.randn(B, 20, 37, 29, generator=g).to(dtype)
    slots = torch.randint(-1, K, (B, 37, 29), generator=g, dtype=torch.int16)
    ss, ns, st, _ = ops.class_sums_pair(s, slots, t, slots, K)
    want = ops._ifvd_loss(s, t, ss, st, ns, slots, 1e-8, mean)
    grad = torch.tensor(0.7, dtype=want[0].dtype)
    want_grad = ops._ifvd_loss_backward(grad, s, want[4], want[5], slots, want[1], want[2], want[3], ns, 1e-8, mean)
    cuda = [x.cuda() for x in (s, t, ss, st, ns, slots)]
    runs = [ops._ifvd_loss(*cuda, 1e-8, mean) for _ in range(3)]
    tol = 1e-9 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: its gradient's ulp
    for got, w in zip(runs[0], want):
        torch.testing.assert_close(got.cpu(), w, rtol=tol, atol=tol)
    assert all(torch.equal(r[0], runs[0][0]) for r in runs)
    got_grad = ops._ifvd_loss_backward(grad.cuda(), cuda[0], runs[0][4], runs[0][5], cuda[5], runs[0][1], runs[0][2],
                                       runs[0][3], cuda[4], 1e-8, mean)
    torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=tol, atol=tol * float(want_grad.abs().max()))
