"""The CPU cosine map's float32 chunk kernels (csrc/cpu/kernels/pixel_centroid_cosine.inc, 8
feature rows over chunks of 8 pixels) against the run loops that float64 takes: both ops (labels
and slot map), forward and backward, with and without the own-centroid counts, on every label
map of tests/labels.py (uniform and mixed chunks, tail pixels, C not a multiple of 8, every pixel
ignored), and with images split over several tasks."""
import dataclasses

import pytest
import torch

from idd_ops import reference
from labels import CASES

ops = torch.ops.idd_ops


def _run(feats, centroids, y, case, slots, counts):
    feats = feats.clone().requires_grad_()
    if slots is None:
        cos, norms = ops.pixel_centroid_cosine(feats, centroids, y, case.ignore_index, 1e-8)
    else:
        cos, norms = ops._pixel_centroid_cosine_slots(feats, centroids, slots, 1e-8, counts)
    centroids_grad = counts is None
    weight = torch.linspace(0.5, 1.5, cos.numel(), dtype=cos.dtype).view(cos.shape)
    inputs = (feats, centroids) if centroids_grad else (feats,)
    grads = torch.autograd.grad((cos * weight).sum(), inputs)
    return (cos, norms) + grads


def _compare(case, feats, with_slots, with_counts):
    y = case.labels()
    centroids, counts = reference.class_centroids(feats, y, case.K, case.ignore_index)
    slots = ops._label_slots(y, case.H, case.W, case.K, case.ignore_index) if with_slots else None
    counts = counts if with_counts else None
    want = _run(feats, centroids.requires_grad_(not with_counts), y, case, slots, counts)
    got = _run(feats.float(), centroids.detach().float().requires_grad_(not with_counts), y, case, slots, counts)
    if with_counts:  # the backward op's outputs themselves, grad_centroids too
        want += _backward(feats, centroids.detach(), slots, counts, want[0], want[1])
        got += _backward(feats.float(), centroids.detach().float(), slots, counts, got[0].detach(), got[1])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        # a zero centroid (clamped-cosine) scales its gradient by 1 / eps: tolerance relative to the largest
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * max(1.0, float(w.detach().abs().max())))


def _backward(feats, centroids, slots, counts, cos, norms):
    grad = torch.linspace(-1.0, 1.0, cos.numel(), dtype=cos.dtype).view(cos.shape)
    return tuple(ops._pixel_centroid_cosine_slots_backward(grad, feats, centroids, slots, cos.detach(), norms, 1e-8,
                                                           counts))


@pytest.mark.parametrize("with_slots,with_counts", [(False, False), (True, False), (True, True)],
                         ids=["labels", "slots", "slots-counts"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_float32_chunks_match_the_float64_runs(case, with_slots, with_counts):
    _compare(case, case.feats(), with_slots, with_counts)


ODD = next(c for c in CASES if c.id == "odd-sizes")  # B=3, 7 x 9 = 63 pixels, C=13


@pytest.mark.parametrize("case,threads", [
    # 2 and 3 tiles of whole chunks per image; uniform spans cross the tiles' edges
    (next(c for c in CASES if c.id == "straddling-runs"), 3),
    (next(c for c in CASES if c.id == "straddling-runs"), 5),
    # tiles [0, 32) and [32, 63): the second one starts past 0 and ends in the 7 tail pixels
    (ODD, 4),
    # one image of 15 pixels: tiles [0, 8) and [8, 15), the second one tail pixels only
    (dataclasses.replace(ODD, id="tail-tile", B=1, H=3, W=5, Hy=6, Wy=10), 2),
], ids=["straddling-3", "straddling-5", "odd-4", "tail-tile-2"])
def test_images_split_over_tasks(case, threads):
    """More threads than images: the forward splits each image's pixels into tiles of whole
    chunks (and the tail pixels); the C=21 run also has a partial row group in every tile."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare(case, case.feats(), True, True)
        _compare(case, case.feats(C=21), False, False)
    finally:
        torch.set_num_threads(before)
