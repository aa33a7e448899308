"""Sizes of the terms that scale-free outputs are made of: compare.py's noise allowance.

A cosine, a normalised affinity or a distance over its mean is of size 1 whatever the inputs'
scale, and it is 0 with a zero gradient in degenerate cases (a pixel that is its own class, one
pooled pixel, one class pair, one channel). Both sides are then rounding noise, and their
relative error means nothing; what they can be held to is a few roundoffs of their terms.
"""
import torch

from idd_ops import reference

PRECISIONS = ("float64", "float32", "float16", "bfloat16")  # least precise last
# the roundoff of the arithmetic: the dtype's own (half types accumulate in float32, but some paths
# keep them as GEMM operands: the next CUDA set's bfloat16 SKD, ARCHITECTURE.md)
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


def distance_noise(centroids, counts, metric, eps):
    """(amplification, conditioning) of distances over their mean: a raw distance rounds at the
    size of its terms (1 for cosine, the centroids' spread for euclidean, its square for
    sqeuclidean), and the "mean" normaliser (floored at eps) divides that rounding by the mean;
    a gradient also rounds at the centroids' size over their closest pair's distance (inf for a
    pair at distance 0: see coincident_classes)."""
    c = centroids.detach().double()
    valid = reference._valid_entries(counts)
    if not valid.any():
        return 1.0, 1.0
    raw = reference.class_distance_matrix(c, counts, metric)
    present = counts > 0
    centred = c - (c * present[..., None]).sum(1, keepdim=True) / present.sum(1).clamp_min(1)[:, None, None]
    spread = float(torch.linalg.vector_norm(centred, dim=2)[present].max())
    size = float(torch.linalg.vector_norm(c, dim=2)[present].max())
    # every present class on one point: the distances are 0 but for the centroids' own rounding, at
    # their size (a path that sums in another order rounds them apart: the default CUDA kernels)
    spread = spread if spread > 0 else size
    term = {"cosine": 1.0, "euclidean": spread, "sqeuclidean": spread ** 2}[metric]
    n = valid.sum((1, 2))
    means = (torch.where(valid, raw, 0.0).sum((1, 2)) / n.clamp_min(1))[n > 0]
    amplification = max(1.0, term / max(float(means.min()), eps))
    closest = reference.class_distance_matrix(c, counts, "euclidean")[valid].min()
    return amplification, max(1.0, size / float(closest)) if closest > 0 else float("inf")


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


def gram_rounding(student, s_counts, teacher, t_counts, metric, reduction):
    """Sizes of the rounding of distances formed as |ci|^2 + |cj|^2 - 2 <ci, cj> (METHOD.md 8) in
    an IDD loss without a normaliser, in roundoffs of that arithmetic: {"loss", "grad:student"}
    (the gradient w.r.t. the student's class sums). A squared distance then rounds at
    S = |ci|^2 + |cj|^2 of the centroids shifted by the image's first present one, so a
    distance a at a / sqrt(S) of its terms is off by about S / (2 a) roundoffs: every pair of
    classes that lie close together compared with their size (a few one-channel centroids drawn
    at random are close: found at seed 20261210) carries that into its term (a - b)^2, and into
    the gradient through (a - b) and 1 / a."""
    if metric not in ("euclidean", "sqeuclidean"):
        return {}
    valid = reference._valid_entries(s_counts) & reference._valid_entries(t_counts)
    if not valid.any():
        return {}
    cs = student.detach().double() / s_counts.clamp_min(1)[..., None]
    ct = teacher.detach().double() / t_counts.clamp_min(1)[..., None]
    big = torch.finfo(torch.float64).max

    def shifted(c, counts):  # by each image's first present centroid, as the K x K math does (idd_tail.h)
        first = (counts > 0).int().argmax(1).view(-1, 1, 1).expand(-1, 1, c.shape[2])
        return c - c.gather(1, first)

    def rounding(c):  # (the distances, their absolute rounding) [B, K, K]
        sq = (c * c).sum(-1)
        s = sq[:, :, None] + sq[:, None, :]
        d = reference.class_distance_matrix(c, torch.ones(c.shape[:2], dtype=torch.long), metric)
        if metric == "sqeuclidean":
            return d, s
        return d, torch.where(d > 0, s / (2 * d.clamp_min(1e-300)), big)

    (a, da), (b, db) = rounding(shifted(cs, s_counts)), rounding(shifted(ct, t_counts))
    zero = torch.zeros((), dtype=torch.float64)
    loss_terms = torch.where(valid, 2 * (a - b).abs() * (da + db), zero)
    if metric == "euclidean":  # the term's gradient 2 (a - b) (ci - cj) / a, |ci - cj| = a
        grad_terms = 2 * (da + db) + 2 * (a - b).abs() * da / a.clamp_min(1e-300)
    else:  # 2 (a - b) 2 (ci - cj), |ci - cj| = sqrt(a)
        grad_terms = 4 * (da + db) * a.sqrt()
    grad_terms = torch.where(valid, grad_terms, zero).sum(2) / s_counts.clamp_min(1)  # per class [B, K]
    pairs = valid.sum((1, 2)) // 2  # what the loss divides by: each unordered pair once
    if reduction == "mean":
        n = float(pairs.sum())
        return {"loss": float(loss_terms.sum()) / n, "grad:student": float(grad_terms.max()) / n}
    per_image = pairs.clamp_min(1).double() if reduction == "none" else torch.ones_like(pairs, dtype=torch.float64)
    return {"loss": float((loss_terms.sum((1, 2)) / per_image).max()),
            "grad:student": float((grad_terms / per_image[:, None]).max())}
