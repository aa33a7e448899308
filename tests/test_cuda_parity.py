"""Every op at the benchmark shapes (benchmarks/cases.py) on CUDA against the reference in
float64, forward and backward, with the caching allocator's free blocks filled with NaN before
the fused call, so an output element no kernel writes fails the comparison. Several shapes pass
the 65535 x 256 elements (about 16.8M) at which the grid-stride loops wrap: the centroid
backward (134M at the cityscapes teacher), the softmax-KL backward (pixel_kd 80M, cwd 34M) and
the position loss (21M). About 1-2 s each on a GPU; skipped without one."""
import pytest
import torch

import idd_ops
from idd_ops import reference

from test_cuda_runtime import poison_free_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# (benchmark case, elements of the student's gradient: > 16.8M where the backward loop wraps)
CASES = ["class_centroids cityscapes", "class_centroids cityscapes fragmented", "idd_loss cityscapes",
         "idd_loss ade20k fragmented", "idd_loss k1000", "position_loss 512x1024", "pixel_kd", "cwd", "skd pool2",
         "ifvd"]
GRID_STRIDE_WRAP = 65535 * 256


@pytest.fixture(autouse=True)
def _release_cached_memory():
    """The float64 references peak at up to about 20 GB (idd_loss k1000); each test worker's
    caching allocator would keep that reserved for the rest of the stage, where many workers
    share one GPU."""
    yield
    torch.cuda.empty_cache()


def _run(module, call, inputs, weight):
    """Forward through `module` and backward of the output weighted by `weight`: (out, grad)."""
    out = call(module, *inputs)
    (out.double() * weight).sum().backward()
    return out.detach(), inputs[0].grad


@pytest.mark.parametrize("name", CASES)
def test_benchmark_shape_matches_float64_reference(name):
    from benchmarks import cases

    case = cases.make(name, "cuda")
    inputs = [t.detach() for t in case.inputs]
    inputs[0].requires_grad_()
    inputs64 = [t.detach().double() if t.is_floating_point() else t for t in inputs]
    inputs64[0].requires_grad_()
    want = case.call(reference, *inputs64)
    weight = torch.rand(want.shape, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    (want * weight).sum().backward()
    want, want_grad = want.detach(), inputs64[0].grad
    poison_free_memory("cuda", nbytes=4 * inputs[0].numel() * 4 + (1 << 28))
    got, got_grad = _run(idd_ops, case.call, inputs, weight)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all(), "an output element was not written"
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-3, atol=1e-4 * float(want_grad.abs().max()))


@pytest.mark.parametrize("own", [False, True], ids=["centroids", "own-centroids"])
def test_cosine_slots_at_the_ifvd_shape(own):
    """_pixel_centroid_cosine_slots (the slot kernels, IFVD's CUDA path) at the ifvd
    benchmark case's teacher (B=8, C=2048, 64x128: 134M gradient elements, past the wrap) against
    the float64 reference, forward and backward: both gradients with independent centroids; with
    the features' own centroids and counts (IFVD's student), the features' whole gradient, the
    reference's through the map and the centroids."""
    from benchmarks import cases

    _, feats, labels = [t.detach() for t in cases.make("ifvd", "cuda").inputs]
    slots = torch.ops.idd_ops._label_slots(labels, feats.shape[2], feats.shape[3], 19, 255)
    centroids, counts = reference.class_centroids(feats, labels, 19)
    inputs = [feats.requires_grad_()] + ([] if own else [centroids.requires_grad_()])
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    cent64 = reference.class_centroids(inputs64[0], labels, 19)[0] if own else inputs64[1]
    want = reference.pixel_centroid_cosine(inputs64[0], cent64, slots, 1e-8)
    weight = torch.rand(want.shape, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want_grads = torch.autograd.grad((want * weight).sum(), inputs64)
    poison_free_memory("cuda", nbytes=4 * feats.numel() * 4 + (1 << 28))
    got = torch.ops.idd_ops._pixel_centroid_cosine_slots(feats, centroids, slots, 1e-8, counts if own else None)[0]
    got_grads = torch.autograd.grad((got.double() * weight).sum(), inputs)
    torch.cuda.synchronize()
    assert feats.numel() > GRID_STRIDE_WRAP
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all(), "an output element was not written"
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-4 * float(w.abs().max()))


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_position_loss_elementwise_at_the_wrap(reduction):
    """The forward kernel writes every element of reduction="none" past the wrap too."""
    B, M, H, W = 8, 5, 512, 1024
    assert B * M * H * W > GRID_STRIDE_WRAP
    kinds = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")
    pred = torch.rand(B, M, H, W, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = reference.position_encoding_loss(pred.double(), kinds, reduction=reduction)
    poison_free_memory("cuda", nbytes=2 * pred.numel() * 4)
    got = idd_ops.position_encoding_loss(pred, kinds, reduction=reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
