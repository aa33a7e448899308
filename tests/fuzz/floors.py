"""Sizes of the terms that scale-free outputs are made of: compare.py's noise allowance.

A cosine, a normalised affinity or a distance over its mean is of size 1 whatever the inputs'
scale, and it is 0 with a zero gradient in degenerate cases (a pixel that is its own class, one
pooled pixel, one class pair, one channel). Both sides are then rounding noise, and their
relative error means nothing; what they can be held to is a few roundoffs of their terms.
floor_of gives those sizes; the IDD losses and the distance matrix have a first-order bound
instead (distance_rounding.py, scaled_floors), much tighter where their terms cancel.
"""
import torch

from idd_ops import reference

PRECISIONS = ("float64", "float32", "float16", "bfloat16")  # least precise last
# the roundoff of the arithmetic: the dtype's own (half types accumulate in float32, but some paths
# keep them as GEMM operands: CUDA's bfloat16 SKD, ARCHITECTURE.md)
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
# The noise allowance: this many roundoffs of the terms an output is made of (compare.py)
# (64 was passed by 6 to 16 % in 4 of 30000 cases at seed 20261205, maps of one channel)
NOISE_ULPS = 128.0


def least_precise(tensors) -> str:
    """The name of the least precise floating dtype among `tensors` ("float64" where none is)."""
    names = [str(x.dtype).removeprefix("torch.") for x in tensors if x.is_floating_point()]
    return max(names, key=PRECISIONS.index, default="float64")


def floor_of(output, reduction, grads, inputs, dim=1, count=1):
    """Sizes of the terms of a scale-free output (cosines, normalised affinities, distances over
    their mean: 1, or `count` of them under a "sum") and of its gradients (1 / |x| per vector x
    along `dim`, over the count a "mean" divides by): compare.py's noise allowance."""
    out = {output: float(max(count, 1)) if reduction == "sum" else 1.0}
    for name in grads:
        x = inputs[name].detach().double()
        norms = torch.linalg.vector_norm(x, dim=dim) if x.numel() else x.new_zeros(0)
        norms = norms[torch.isfinite(norms) & (norms > 0)]
        if norms.numel():
            n = max(1, norms.numel()) if reduction == "mean" else 1
            out["grad:" + name] = 1.0 / (float(norms.min()) * n)
    return out


def coincident_classes(centroids, counts):
    """Whether two present classes of an image have the same centroid exactly (in float64). The
    euclidean distance has no gradient there (METHOD.md 3 takes 0); a path whose centroids round
    apart by a few ulps gets a unit vector in the direction of its rounding instead, so no
    gradient through such a pair can be compared. Found with identical images whose classes
    cover the same pixels, pooled by centroids="batch"."""
    valid = reference._valid_entries(counts)
    if not valid.any():
        return False
    return bool((reference.class_distance_matrix(centroids.detach().double(), counts, "euclidean")[valid] == 0).any())


# The first-order sizes of distance_rounding are within a small factor of what a correct
# implementation is off by (dot products of many terms, an unlucky order): FIRST_ORDER_ULPS of
# them, where NOISE_ULPS allows 128 for the scale-free sizes of floor_of (the worst case of the
# runs in docs/DEVELOPING.md used 0.72 of it). A gradient 1 % off then fails in all but a few
# cases (runner.mutation_check).
FIRST_ORDER_ULPS = 16.0


def scaled_floors(floors, math, precision):
    """First-order roundings in roundoffs of the arithmetic `math` (a dtype name), as floors of
    compare.py's allowance (NOISE_ULPS roundoffs of the case's `precision`)."""
    scale = UNIT_ROUNDOFF[math] / UNIT_ROUNDOFF[precision] * FIRST_ORDER_ULPS / NOISE_ULPS
    return {k: v * scale for k, v in floors.items()}


def near_cosine_floor(feats, centroids, slots, eps, unit, counts=None):
    """Whether a kept pixel's cosine denominator |f| |c| (its feature [B, C, H, W] and its class's
    centroid [B, K, C], by `slots` [B, H, W], -1 ignored) lies within FIRST_ORDER_ULPS of its
    rounding of eps. The gradient jumps there (c / eps where floored, a projection where not), so
    a path whose product rounds to the other side of eps takes the other branch's gradient whole,
    and no gradient of the case can be compared. |f| and |c| each round at about C / 2 roundoffs
    `unit`, a centroid formed from n pixels (`counts` [B, K]) at n more. Found at seed 20261240:
    IFVD's |f| |c| 1.2e-7 above eps = 1e-3 in float32, on the emulated CUDA kernels."""
    f = feats.detach().double().flatten(2)
    s = slots.flatten(1).long()
    if not f.numel() or not s.numel() or not centroids.shape[1]:
        return False
    at = s.clamp_min(0)
    product = torch.linalg.vector_norm(f, dim=1) * torch.gather(
        torch.linalg.vector_norm(centroids.detach().double(), dim=2), 1, at)
    n = torch.gather(counts.double(), 1, at) if counts is not None else 0.0
    margin = FIRST_ORDER_ULPS * unit * (f.shape[1] + n) * eps
    return bool(((product - eps).abs() <= margin)[s >= 0].any())


def math_unit(precision):
    """The roundoff of an op's arithmetic on inputs of `precision` (the half types accumulate in
    float32)."""
    return UNIT_ROUNDOFF["float32" if precision in ("float16", "bfloat16") else precision]
