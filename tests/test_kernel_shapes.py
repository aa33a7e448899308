"""softmax_kl and position_encoding_loss at shapes that reach every variant of their kernels:
16-byte packs and their one-element fallback (odd lengths, unaligned pointers), a warp or a
block per CWD row, class counts that leave a short last chunk, rows wider than a block."""
import math

import pytest
import torch

import idd_ops
from idd_ops import reference
from idd_ops.position import num_maps
from conftest import TOLERANCES

ops = torch.ops.idd_ops


def unaligned(x):
    """x's values at a data pointer one element past an aligned one (contiguous all the same)."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    return view


# [outer, length, inner]: pixel KD is [B, K, H*W], CWD [B*C, H*W, 1]
KL_SHAPES = {
    "pixels packed": (2, 19, 4096),
    "pixels odd inner": (2, 19, 1027),
    "pixels 150 classes": (1, 150, 512),
    "row per warp": (9, 1000, 1),
    "row per warp, odd length": (9, 1001, 1),
    "row per block": (3, 4096, 1),
    "row per block, odd length": (3, 4099, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", list(KL_SHAPES.values()), ids=list(KL_SHAPES))
def test_softmax_kl_shapes(device, dtype, shape):
    check_softmax_kl(device, dtype, shape, aligned=True)


@pytest.mark.parametrize("shape", list(KL_SHAPES.values()), ids=list(KL_SHAPES))
def test_softmax_kl_unaligned_inputs(device, shape):
    check_softmax_kl(device, torch.float32, shape, aligned=False)


def check_softmax_kl(device, dtype, shape, aligned):
    """Values, both lse and the gradient of softmax_kl against the float64 reference."""
    g = torch.Generator().manual_seed(sum(shape))
    s64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    t64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    s, t = s64.to(device, dtype), t64.to(device, dtype)
    if not aligned:
        s, t = unaligned(s), unaligned(t)
    T = 2.0
    s = s.requires_grad_()
    kl, lse_s, lse_t = ops.softmax_kl(s, t, T)
    w = torch.randn(kl.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((kl * w.to(device, kl.dtype)).sum(), s)

    sr, tr = s.detach().double().cpu().requires_grad_(), t.double().cpu()
    kl_ref = reference._kl_rows(sr / T, tr / T, 1)
    (grad_ref,) = torch.autograd.grad((kl_ref * w).sum(), sr)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(kl.double().cpu(), kl_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_s.double().cpu(), torch.logsumexp(sr.detach() / T, 1), rtol=tol, atol=tol)
    torch.testing.assert_close(lse_t.double().cpu(), torch.logsumexp(tr / T, 1), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=tol, atol=tol)


POSITION_KINDS = ["horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes", "sinusoidal"]
# "past the table": wider than the CUDA column table of every dtype (47 KiB of float32 columns:
# 12032; float64 6016), which the per-element kernels then serve
POSITION_SIZES = {"packed": (37, 64), "odd width": (5, 30), "wide rows": (3, 2048), "tall": (600, 16),
                  "past the table": (2, 12033)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("size", list(POSITION_SIZES.values()), ids=list(POSITION_SIZES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_position_loss_shapes(device, dtype, size, reduction):
    if dtype == torch.float16 and reduction == "sum":
        pytest.skip("a half sum of this many squared errors nears the half range")
    M = num_maps(POSITION_KINDS)
    g = torch.Generator().manual_seed(size[0])
    p64 = torch.rand(2, M, *size, generator=g, dtype=torch.float64)
    p = p64.to(device, dtype).requires_grad_()
    loss = idd_ops.position_encoding_loss(p, POSITION_KINDS, reduction=reduction)
    w = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * w.to(device, loss.dtype)).sum(), p)

    pr = p.detach().double().cpu().requires_grad_()
    loss_ref = reference.position_encoding_loss(pr, POSITION_KINDS, reduction=reduction)
    (grad_ref,) = torch.autograd.grad((loss_ref * w).sum(), pr)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_forward_backward_capture_in_a_cuda_graph():
    """Pixel KD, CWD and the position loss, forward and backward, replayed from one CUDA graph."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 19, 64, 128, generator=g).cuda().requires_grad_()
    t = torch.randn(2, 19, 64, 128, generator=g).cuda()
    f = torch.randn(2, 64, 32, 64, generator=g).cuda().requires_grad_()
    ft = torch.randn(2, 64, 32, 64, generator=g).cuda()
    kinds = ["horizontal", "vertical", "gaussian"]
    p = torch.rand(2, 3, 64, 128, generator=g).cuda().requires_grad_()

    def step():
        losses = [idd_ops.pixel_kd_loss(s, t), idd_ops.channel_wise_distillation_loss(f, ft),
                  idd_ops.position_encoding_loss(p, kinds)]
        grads = torch.autograd.grad(sum(losses), (s, f, p))
        return [x.detach() for x in losses], grads

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager[0] + list(eager[1]), captured[0] + list(captured[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["pixels", "rows"])
def test_teacher_minus_inf_everywhere_contributes_nothing(layout, device):
    """A vector whose teacher is -inf at every entry: KL 0, no gradient, no NaN anywhere; its
    log-sum-exp is stored as +inf (csrc/common/softmax_kl.h), so the backward's exp(t - lse_t) is 0."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 19, 4096) if layout == "pixels" else (6, 4096, 1)
    s = torch.randn(shape, generator=g).to(device).requires_grad_()
    t = torch.randn(shape, generator=g).to(device)
    dead = (0, slice(None), 5) if layout == "pixels" else (4, slice(None), 0)
    t[dead] = -math.inf
    kl, _, lse_t = ops.softmax_kl(s, t, 1.0)
    (grad,) = torch.autograd.grad(kl.sum(), s)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert kl[dead[0], dead[2]].item() == 0 and lse_t[dead[0], dead[2]].item() == math.inf
    assert (grad[dead] == 0).all()
    torch.testing.assert_close(kl.double().cpu(), reference._kl_rows(s.detach().double().cpu(), t.double().cpu(), 1),
                               rtol=1e-4, atol=1e-5)
