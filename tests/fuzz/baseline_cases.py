"""Random cases of the baselines (pixel KD, CWD, SKD, IFVD) and the position loss: their
generators, registered into cases.OPS (imported from cases.py, after IDD's)."""
import torch

import idd_ops
from idd_ops import reference

from .cases import (REDUCTIONS, OpSpec, _build_pair, _draw_pair, _draw_tokens, _nan_at_ignored, _sub, _tokens,
                    register)
from .floors import UNIT_ROUNDOFF, floor_of, least_precise, math_unit, near_cosine_floor
from .inputs import (draw_dtype, draw_feats, draw_labels, draw_labels_for, draw_num_classes, draw_size, make_feats,
                     make_labels, pick)


def draw_logit_pair(rng, shape):
    """Student and teacher logits of one shape and dtype at a shared scale, each -inf somewhere
    now and then, and a temperature: the parameters of every softmax-KL case."""
    dtype = draw_dtype(rng)
    scale = pick(rng, {1.0: 4, 5.0: 2, 30.0: 1, 100.0: 1})
    s = draw_feats(rng, shape, dtype, offset=False, scale=scale)
    t = draw_feats(rng, shape, dtype, offset=False, scale=scale)
    for x in (s, t):
        if rng.random() < 0.1:
            x["special"] = "neg_inf"
    return {"student": s, "teacher": t, "temperature": pick(rng, {1.0: 3, 2.0: 1, 4.0: 2, 0.5: 1, 3.7: 1})}


def _draw_logits(rng, with_labels):
    """Logits at a scale (confident teachers have logits around 30-100: METHOD.md 8), -inf now
    and then (a class ruled out), a temperature that is or is not a power of two."""
    B = draw_size(rng, 0, 3, empty=0.04)
    shape = (B, draw_size(rng, 0, 12 if with_labels else 8), draw_size(rng, 0, 10), draw_size(rng, 0, 10))
    p = {**draw_logit_pair(rng, shape), "reduction": rng.choice(REDUCTIONS)}
    if with_labels and rng.random() < 0.6:
        K = max(shape[1], 1)
        p["labels"] = draw_labels(rng, B, K, shape[2:])
        if shape[1] == 0:  # logits without classes: only ignored pixels are valid labels
            p["labels"].update(ignore_frac=1.0, ignore_index=255)
    return p


def _build_logits(p, seed, device):
    x = {"student": make_feats(p["student"], _sub(seed, 1), device, True),
         "teacher": make_feats(p["teacher"], _sub(seed, 2), device, False)}
    if "labels" in p:
        x["labels"] = make_labels(p["labels"], _sub(seed, 0), device)
    return x


def _pixel_kd(module):
    def call(x, p):
        kw = {}
        if "labels" in p:
            kw = {"labels": x["labels"], "ignore_index": p["labels"]["ignore_index"]}
        return {"loss": module.pixel_kd_loss(x["student"], x["teacher"], temperature=p["temperature"],
                                             reduction=p["reduction"], **kw)}
    return call


def _cwd(module):
    def call(x, p):
        return {"loss": module.channel_wise_distillation_loss(x["student"], x["teacher"], p["temperature"],
                                                              p["reduction"])}
    return call


def _softmax_kl_floor(dim):
    """A logit's gradient T (p_s - p_t) (times what the reduction divides by) differences two
    probabilities exp(x / T - lse), each computed in the accumulation dtype (float32 for half
    inputs) with an error of about |x| / T roundoffs of itself: where student and teacher agree
    on a confident class, p_s - p_t is far below both and that rounding is all either side holds
    (the float32 reference included; found at seed 20261210: float16 logits of 30-80 at T = 3.7).
    In roundoffs of the case's precision, along `dim` (classes for pixel KD, pixels for CWD)."""
    def floor(p, x):
        s, t = (x[k].detach().double() for k in ("student", "teacher"))
        if s.numel() == 0:
            return {}
        T = p["temperature"]
        finite = torch.cat([v[torch.isfinite(v)] for v in (s, t)])
        size = float(finite.abs().max()) / T + 1 if finite.numel() else 1.0
        flat = [v.flatten(dim) if dim == 2 else v for v in (s, t)]
        peak = max(float(torch.nan_to_num(torch.softmax(v / T, dim)).max()) for v in flat)
        acc = "float64" if x["student"].dtype == torch.float64 else "float32"
        precision = least_precise((x["student"], x["teacher"]))
        n = 1
        if p["reduction"] == "mean":  # pixel KD: the kept pixels; CWD: the B x C vectors
            if dim == 1 and "labels" in p:
                kept = reference.resize_labels(x["labels"], s.shape[2:]) != p["labels"]["ignore_index"]
                n = int(kept.sum())
            else:
                n = s.numel() // (s.shape[1] if dim == 1 else s[0, 0].numel())
        ratio = UNIT_ROUNDOFF[acc] / UNIT_ROUNDOFF[precision]
        return {"grad:student": T * peak * size * ratio / max(n, 1)}
    return floor


register(OpSpec("pixel_kd", lambda rng: _draw_logits(rng, True), _build_logits, _pixel_kd(idd_ops),
                _pixel_kd(reference), grads=("student",), floor=_softmax_kl_floor(1)))
register(OpSpec("cwd", lambda rng: _draw_logits(rng, False), _build_logits, _cwd(idd_ops), _cwd(reference),
                grads=("student",), floor=_softmax_kl_floor(2)))


# Most bytes of one [B, P, P] affinity matrix of the reference's SKD (float64, P pooled pixels):
# it holds several, with their gradients. At --size-scale 12 a batch of 33 maps of 59 x 131 drew
# 16 GB a matrix and the fuzzer was killed for memory.
SKD_AFFINITY_BYTES = 2 ** 28


def _draw_skd(rng):
    s, t = _draw_pair(rng, same_size=True, min_channels=1)
    if rng.random() < 0.4:  # a student far from its teacher's scale (the batched SKD lost 1e-2 at 1e-3)
        s["scale"], t["scale"] = rng.choice(((1e-3, 1.0), (1e-4, 1.0), (1.0, 1e-3), (1e3, 1.0), (30.0, 1e-4)))
    p = {"student": s, "teacher": t, "pool": pick(rng, {1: 2, 2: 3, 3: 1, 4: 1}), "reduction": rng.choice(REDUCTIONS)}
    # smaller maps, then fewer images, where the reference's affinities would pass the budget
    # (the draws stay the same)
    B, _, H, W = s["shape"]

    def pooled(h, w):
        return -(-h // p["pool"]) * -(-w // p["pool"])

    while 8 * pooled(H, W) ** 2 > SKD_AFFINITY_BYTES:
        H, W = -(-H * 4 // 5), -(-W * 4 // 5)
    B = min(B, max(1, SKD_AFFINITY_BYTES // max(8 * pooled(H, W) ** 2, 1)))
    for x in (s, t):
        x["shape"] = [B, x["shape"][1], H, W]
    return p


def _build_skd(p, seed, device):
    return {"student": make_feats(p["student"], _sub(seed, 1), device, True),
            "teacher": make_feats(p["teacher"], _sub(seed, 2), device, False)}


def _skd(module):
    def call(x, p):
        return {"loss": module.structural_kd_loss(x["student"], x["teacher"], p["pool"], p["reduction"])}
    return call


def _skd_floor(p, x):
    B, _, H, W = x["student"].shape
    P = -(-H // p["pool"]) * -(-W // p["pool"])
    floors = floor_of("loss", p["reduction"], ("student",), x, count=B * P * P)
    if p["reduction"] == "sum" and "grad:student" in floors:
        # under "sum" a pixel's gradient adds the 2 P entries of its affinity row and column,
        # 4 sum_j (A_S - A_T)_ij S_j: terms 4 P times floor_of's 1 / |x| (a student of one
        # channel, whose gradient is 0, got the reference's rounding of them; seed 20261252)
        floors["grad:student"] *= 4 * P
    return floors


register(OpSpec("skd", _draw_skd, _build_skd, _skd(idd_ops), _skd(reference), grads=("student",), floor=_skd_floor))


def _draw_ifvd(rng):
    s, t = _draw_pair(rng, same_size=True)
    K = draw_num_classes(rng)
    p = {"student": s, "teacher": t, "labels": draw_labels_for(rng, s, K), "K": K,
         "eps": pick(rng, {1e-8: 5, 1e-3: 1}), "reduction": rng.choice(REDUCTIONS)}
    _draw_tokens(rng, p)
    _nan_at_ignored(rng, p, "student")
    return p


def _ifvd(module):
    def call(x, p):
        s, t, kw = _tokens(p, x["student"], x["teacher"])
        return {"loss": module.intra_class_variation_loss(s, t, x["labels"], p["K"], p["labels"]["ignore_index"],
                                                          p["eps"], p["reduction"], **kw)}
    return call


def _ifvd_floor(p, x):
    s, y, K, ignore = x["student"], x["labels"], p["K"], p["labels"]["ignore_index"]
    floors = floor_of("loss", p["reduction"], ("student",), x, count=s[:, :1].numel())
    c, n = reference.class_centroids(s.detach().double(), y, K, ignore)
    # the student's gradient also comes through its class means, in terms of size 1 / |centroid|: a
    # mean far shorter than its pixels where their values cancel (seed 20261241: one channel, means
    # 2e-2 of the pixels' size, the emulated CUDA kernels 1.4x past the pixels' allowance)
    norms = torch.linalg.vector_norm(c, dim=2)[n > 0]
    norms = norms[torch.isfinite(norms) & (norms > 0)]
    if norms.numel() and "grad:student" in floors:
        pixels = s[:, :1].numel() if p["reduction"] == "mean" else 1
        floors["grad:student"] = max(floors["grad:student"], 1.0 / (float(norms.min()) * pixels))
    slots = reference.label_slots(y, tuple(s.shape[2:]), K, ignore)
    if near_cosine_floor(s, c, slots, p["eps"], math_unit(least_precise([s, x["teacher"]])), n):
        floors["grad:student"] = float("inf")  # no gradient to compare (floors.near_cosine_floor)
    return floors


register(OpSpec("ifvd", _draw_ifvd, _build_pair, _ifvd(idd_ops), _ifvd(reference), grads=("student",),
                floor=_ifvd_floor))

# kind -> whether it needs (height >= 2, width >= 2)
_POSITION_KINDS = {"horizontal": (False, True), "vertical": (True, False), "gaussian": (True, True),
                   "horizontal_stripes": (False, False), "vertical_stripes": (False, False),
                   "sinusoidal": (True, True)}


def _draw_position(rng):
    kinds = rng.sample(sorted(_POSITION_KINDS), rng.randint(1, 3))
    rows = any(_POSITION_KINDS[k][0] for k in kinds)
    cols = any(_POSITION_KINDS[k][1] for k in kinds)
    B = draw_size(rng, 0, 3, empty=0.04)
    H, W = draw_size(rng, 2 if rows else 0, 14), draw_size(rng, 2 if cols else 0, 14)
    nf = rng.randint(1, 3)
    M = sum(4 * nf if k == "sinusoidal" else 1 for k in kinds)
    return {"pred": draw_feats(rng, (B, M, H, W), draw_dtype(rng), offset=False, scale=pick(rng, {1.0: 3, 0.3: 1})),
            "kinds": kinds, "num_frequencies": nf, "num_stripes": rng.randint(1, 7),
            "sigma": pick(rng, {0.25: 3, 0.1: 1, 1.5: 1}), "reduction": rng.choice(REDUCTIONS)}


def _position(module):
    def call(x, p):
        return {"loss": module.position_encoding_loss(x["pred"], p["kinds"], p["reduction"], p["num_frequencies"],
                                                      p["num_stripes"], p["sigma"])}
    return call


register(OpSpec("position", _draw_position, lambda p, seed, device: {"pred": make_feats(p["pred"], seed, device, True)},
                _position(idd_ops), _position(reference), grads=("pred",)))
