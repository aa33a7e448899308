"""Rounding of the K x K distance math (METHOD.md 3-4, 8) to the first order: what a correct
implementation may be off by, in roundoffs, for the fuzzer's noise allowance of the raw IDD tail,
the IDD loss and the distance matrix (compare.py; floors.scaled_floors).

Each network's distances R_ij come from a Gram matrix, so each rounds at the size of its terms,
not of itself: |ci|^2 + |cj|^2 of the shifted centroids for the squared distance, that over 2 R
for the euclidean one, about 1 for 1 - cos; the IDD loss's centroids add the rounding of their
sums. The "mean" normaliser m divides them and adds its own; the loss's pair terms (a - b)^2 carry
the rounding of a and b times 2 |a - b|, and a class's gradient the rounding of each pair weight
times |dR/dc| plus each weight times the rounding of dR/dc. Each rounding is counted once, at
the size of its terms, and absolute values add; second-order terms are kept where the first
order is 0. A dot product of many terms or an unlucky order exceeds these sizes by a small
factor, which floors.FIRST_ORDER_ULPS allows.
"""
import torch

from idd_ops import reference

UNIT_FLOAT64 = 2.0 ** -53  # the distance matrix's math is float64 whatever its inputs (METHOD.md 8)
LOSS_WEIGHT = 1.5  # compare.py's largest weight of an output element, which scales its gradient
BIG = 1e150  # the rounding of what cannot be compared (the gradient of a euclidean pair at distance 0)


def _upper(x):
    return x.triu(1)


def network_terms(c, counts, metric, normalize, eps, shift, unit, math_unit=None, dc=None):
    """One network's distance terms from float64 centroids c [B, K, C]: a dict of [B, K, K]
    tensors (R, dR: raw distances and their rounding; g, dg: |dR_ij / dc_i| and its rounding;
    a, da: the distances over the normaliser, and theirs), [B, 1, 1] ones (m, dm: the normaliser
    and its rounding; pairs: valid class pairs i < j; clamped: m does not follow the distances)
    and `valid` (present classes i != j). `shift` ("first", "mean" or None) moves the centroids
    of the euclidean metrics as the implementation does before its Gram form. Roundings are in
    roundoffs `unit`: the K x K math's own (its unit roundoff `math_unit`, default `unit`), plus
    what an error of dc_i [B, K] (in roundoffs `unit`) in each centroid moves."""
    math_scale = (math_unit or unit) / unit
    c = c.detach().double()
    present = counts > 0
    valid = reference._valid_entries(counts)
    if metric != "cosine" and shift and c.shape[1]:
        if shift == "first":
            first = present.int().argmax(1).view(-1, 1, 1).expand(-1, 1, c.shape[2])
            c = c - c.gather(1, first)
        else:
            p = present[..., None].double()
            c = c - (c * p).sum(1, keepdim=True) / p.sum(1, keepdim=True).clamp_min(1)
    norm = torch.linalg.vector_norm(c, dim=2)
    ni, nj = norm[:, :, None], norm[:, None, :]
    if metric == "cosine":  # 1 - <ci, cj> / max(|ci| |cj|, eps)
        den = ni * nj
        floored = den < eps
        cos = (c @ c.transpose(1, 2)) / den.clamp_min(max(eps, 1e-300))
        inv = torch.where(ni > 0, 1 / ni.clamp_min(1e-300), BIG)
        R, dR = 1 - cos, torch.full_like(cos, 2.0 * math_scale)
        # a floored denominator leaves -<ci, cj> / eps: its gradient cj / eps
        sin = (1 - cos * cos).clamp_min(0).sqrt()
        g = torch.where(floored, nj / eps, sin * inv)
        dg = torch.where(floored, 2 * nj / eps, 3 * inv) * math_scale
        if dc is not None:  # a centroid error turns its unit vector by dc / |c|
            turn = dc[:, :, None] * inv
            turn = turn + turn.transpose(1, 2)
            # 1 - cos of an angle 0 turned by t: t^2 / 2, second order where the classes are parallel
            dR = dR + torch.where(floored, (nj * dc[:, :, None] + ni * dc[:, None, :]) / eps,
                                  sin * turn + unit * turn * turn / 2)
            dg = dg + torch.where(floored, dc[:, None, :] / eps, 2 * inv * turn)
    else:
        diff = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist")  # pair by pair: exact to rounding
        move = torch.zeros_like(diff) if dc is None else dc[:, :, None] + dc[:, None, :]  # of ci - cj
        S = ni * ni + nj * nj
        if metric == "euclidean":
            R = diff
            inv = 1 / R.clamp_min(1e-300)
            # sqrt(R^2 + S u) - R: S u / (2 R), and sqrt(S u) at most (a pair at distance 0)
            dR = torch.minimum(S * inv / 2, (S / (math_scale * unit)).sqrt()) * math_scale + move
            g = torch.ones_like(R)
            # the gradient's direction (0 at distance 0: METHOD.md 3) is lost where R is within its
            # rounding, unless every term is exact (S = 0 and no centroid error)
            at_zero = ((S > 0) | (move > 0)).double() * BIG
            dg = torch.where(R > 0, (ni + nj) * inv * math_scale + dR * inv, at_zero)
        else:
            R = diff * diff
            # |ci - cj + e|^2 - |ci - cj|^2: 2 |ci - cj| |e| + |e|^2, the square all there is at distance 0
            # (a pair the "mean" normaliser then divides by eps: found at seed 20261221, pooled classes)
            dR = S * math_scale + 2 * diff * move + unit * move * move
            g, dg = 2 * diff, 2 * (ni + nj) * math_scale + 2 * move
    zero = torch.zeros((), dtype=torch.float64)
    R, dR = torch.where(valid, R, zero), torch.where(valid, dR, zero)
    pairs = _upper(valid).sum((1, 2), keepdim=True).double()
    if normalize:
        mean = _upper(R).sum((1, 2), keepdim=True) / pairs.clamp_min(1)
        rounding = _upper(dR).sum((1, 2), keepdim=True) / pairs.clamp_min(1)
        # floored at eps even when rounded up: a mean within its rounding of eps may or may not be
        clamped = (pairs == 0) | (mean + rounding * unit <= eps)
        m = torch.where(pairs > 0, mean.clamp_min(eps), 1.0)
        # the mean's terms' rounding, and its own sum's (one roundoff of the math, of each term)
        dm = torch.where(clamped, zero, rounding + m * math_scale)
    else:
        clamped = torch.ones_like(pairs, dtype=torch.bool)
        m, dm = torch.ones_like(pairs), torch.zeros_like(pairs)
    a = R / m
    return {"R": R, "dR": dR, "g": g, "dg": dg, "a": a, "da": dR / m + a * dm / m, "m": m, "dm": dm,
            "pairs": pairs, "clamped": clamped, "valid": valid}


def gradient_rounding(net, U, dU, unit):
    """The rounding of dL/dc_i [B, K] for a loss L whose derivative w.r.t. the normalised
    distance of the class pair {i, j} is U_ij (symmetric, 0 off the pairs; dU its rounding):
    sum_j |rounding of W_ij| |dR_ij/dc_i| + |W_ij| (rounding of dR_ij/dc_i), where W_ij =
    (U_ij - kappa) / m and kappa = sum over pairs of U a / pairs carries the normaliser's share
    (METHOD.md 4); |W_ij| is bounded by (|U_ij| + |kappa|) / m. `unit` (the arithmetic's unit
    roundoff) weighs the second-order term, which is what is left where W_ij is 0 but for its
    rounding."""
    zero = torch.zeros((), dtype=torch.float64)
    n = net["pairs"].clamp_min(1)
    kappa = torch.where(net["clamped"], zero, _upper(U.abs() * net["a"]).sum((1, 2), keepdim=True) / n)
    dkappa = torch.where(net["clamped"], zero,
                         _upper(dU * net["a"] + U.abs() * net["da"]).sum((1, 2), keepdim=True) / n)
    m, dm = net["m"], net["dm"]
    W = torch.where(net["valid"], (U.abs() + kappa) / m, zero)  # |W_ij| at most
    dW = torch.where(net["valid"], (dU + dkappa) / m + W * dm / m, zero)
    terms = torch.where(net["valid"], dW * net["g"] + W * net["dg"] + unit * dW * net["dg"], zero)
    return terms.sum(2)


def loss_rounding(s, t, s_counts, reduction, unit):
    """{"loss", "grad:student"}: the rounding of the IDD loss between the networks' terms `s` and
    `t` (network_terms), its gradient w.r.t. the student's class sums (counts `s_counts`). `unit`
    weighs the second-order term: where the networks agree exactly (E = a - b = 0), a pair's
    term is its rounding squared."""
    pair = s["valid"] & t["valid"]
    if not pair.any():
        return {}
    zero = torch.zeros((), dtype=torch.float64)
    E = torch.where(pair, s["a"] - t["a"], zero)
    dE = torch.where(pair, s["da"] + t["da"], zero)
    per_image = _upper(pair).sum((1, 2)).double()  # what the loss divides by
    if reduction == "mean":
        scale = torch.full_like(per_image, 1 / float(per_image.sum()))
    else:
        scale = 1 / per_image.clamp_min(1) if reduction == "none" else torch.ones_like(per_image)
    scale = scale.view(-1, 1, 1)
    loss = (_upper(2 * E.abs() * dE + unit * dE * dE).sum((1, 2), keepdim=True) * scale).flatten()
    U, dU = 2 * LOSS_WEIGHT * scale * E, 2 * LOSS_WEIGHT * scale * dE
    grad = gradient_rounding(s, U, dU, unit) / s_counts.clamp_min(1)
    return {"loss": float(loss.max() if reduction == "none" else loss.sum()), "grad:student": float(grad.max())}


def tail_rounding(student, s_counts, teacher, t_counts, metric, normalize, eps, reduction, unit):
    """{"loss", "grad:student"}: the rounding of the raw IDD tail (class sums and counts in, the
    centroids shifted by each image's first present one, as idd_tail.h does) in roundoffs of its
    K x K math (unit roundoff `unit`); the gradient is w.r.t. the student's class sums. The
    rounding of the centroids themselves (sums / counts, and the shift) is left out: it is
    relative to each centroid, and where it moves a close pair far (a common offset) the
    reference in the case's dtype rounds alike, which relaxes the relative tolerance."""
    terms = [network_terms(sums.detach().double() / n.clamp_min(1)[..., None], n, metric, normalize, eps, "first",
                           unit) for sums, n in ((student, s_counts), (teacher, t_counts))]
    return loss_rounding(*terms, s_counts, reduction, unit)


def centroid_rounding(feats, labels, num_classes, ignore_index, pooled):
    """(centroids, counts, dc) in float64 from features [B, C, H, W] and labels (pooled over the
    batch where `pooled`), dc [B, K] the rounding of a centroid in roundoffs of its sums'
    arithmetic. Each addition rounds at the size of its partial sum, which grows as k |c| (the
    class's mean) plus sqrt(k) of the features' spread: over n additions and in any order, about
    sqrt(n |c|^2 + the mean of |x|^2) once divided by n."""
    x = feats.detach().double()
    c, n = reference.class_centroids(x, labels, num_classes, ignore_index)
    square = reference.class_centroids(x * x, labels, num_classes, ignore_index)[0].sum(2)  # mean of |x|^2
    if pooled:
        total = n.sum(0, keepdim=True)
        c = (c * n[..., None]).sum(0, keepdim=True) / total.clamp_min(1)[..., None]
        square = (square * n).sum(0, keepdim=True) / total.clamp_min(1)
        n = total
    spread = square + (n - 1).clamp_min(0) * (c * c).sum(2)
    return c, n, spread.clamp_min(0).sqrt()


def idd_rounding(student, teacher, metric, normalize, eps, reduction, unit, sums_unit):
    """{"loss", "grad:student"}: the rounding of inter_class_distance_loss in roundoffs `unit`
    (the case's precision), from each network's (centroids, counts, dc) of centroid_rounding: the
    centroid passes' sums (unit roundoff `sums_unit`) and the float64 K x K math; the gradient is
    w.r.t. the student's features (a class's over its pixel count)."""
    s, t = (network_terms(c, n, metric, normalize, eps, "first", unit, UNIT_FLOAT64, dc * sums_unit / unit)
            for c, n, dc in (student, teacher))
    return loss_rounding(s, t, student[1], reduction, unit)


# compare.py weighs each output element by at most 1.5 before its gradient: a matrix's pair of
# entries by 3
MATRIX_PAIR_WEIGHT = 2 * LOSS_WEIGHT


def matrix_rounding(centroids, counts, metric, normalize, eps):
    """{"dist", "grad:centroids"}: the rounding of class_distance_matrix (centred centroids, as
    its composite kernel does) in roundoffs of its float64 math."""
    net = network_terms(centroids, counts, metric, normalize, eps, "mean", UNIT_FLOAT64)
    if not net["valid"].any():
        return {}
    U = torch.where(net["valid"], MATRIX_PAIR_WEIGHT, 0.0).double()
    return {"dist": float(net["da"].max()),
            "grad:centroids": float(gradient_rounding(net, U, torch.zeros_like(U), UNIT_FLOAT64).max())}
