"""Random cases of the public functions (idd_ops.*) and of the raw ops (torch.ops.idd_ops.*, in
raw_ops.py): what a case is, the registry, and the generators of IDD and its building blocks (the
baselines' and the position loss's: baseline_cases.py).

A case is (op, seed). The seed decides everything: `draw` turns a ``random.Random(seed)`` into
the case's description `params` (plain values, printed in a reproducer), and `build` turns the
description and the seed into tensors on a device. Each op spec also says how to call the
library (`fused`) and the float64 reference (`reference`) on those tensors, which outputs to
compare (every output both return) and which inputs to differentiate (`grads`): the
comparison takes the gradient of a fixed random weighting of the float outputs.
"""
import random
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import idd_ops
from idd_ops import reference

from .distance_rounding import centroid_rounding, idd_rounding, matrix_rounding
from .floors import UNIT_ROUNDOFF, coincident_classes, least_precise, math_unit, scaled_floors
from .inputs import (draw_dtype, draw_feats, draw_labels_for, draw_num_classes, draw_scale, draw_size, make_feats,
                     make_labels, pick)

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class OpSpec:
    name: str
    draw: Callable[[random.Random], dict]
    build: Callable[[dict, int, str], Dict[str, torch.Tensor]]  # (params, seed, device) -> named inputs
    fused: Callable[[dict, dict], Dict[str, torch.Tensor]]  # (inputs, params) -> named outputs
    reference: Callable[[dict, dict], Dict[str, torch.Tensor]]
    grads: Tuple[str, ...] = ()  # inputs whose gradient is compared (built requiring grad)
    # (params, inputs) -> {output or "grad:<input>": the scale of the terms it is made of}, for the
    # scale-free outputs that can be 0 but for rounding (see compare.py; floor_of below)
    floor: Optional[Callable[[dict, dict], Dict[str, float]]] = None


OPS: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


@dataclass(frozen=True)
class Case:
    op: str
    seed: int
    params: dict

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    def describe(self) -> str:
        return f"{self.op} seed={self.seed} {self.params}"


def make_case(op: str, seed: int) -> Case:
    return Case(op, seed, OPS[op].draw(random.Random(f"{op}:{seed}")))


def _sub(seed, k):
    """The seed of a case's k-th tensor (distinct tensors get distinct values)."""
    return seed * 16 + k


def _nan_at_ignored(rng, p, feats_key, labels_key="labels", prob=0.08):
    """Now and then a NaN feature at one ignored pixel (found at build time): it must change
    nothing, the class sums taking the pixels of their class alone (METHOD.md 2), whatever the
    kernel's pivot or its reading order."""
    if rng.random() < prob and p[labels_key]["ignore_frac"] > 0 and p[feats_key]["layout"] != "expanded":
        p[feats_key]["nan_at_ignored"] = rng.choice(("first", "any"))


def build_feats(p, key, seed, device, grad, labels=None, ignore_index=None):
    """Features p[key] (with a NaN at an ignored pixel if the description asks for one)."""
    spec = dict(p[key])
    where = spec.pop("nan_at_ignored", None)
    x = make_feats(spec, seed, device, grad)
    if where is None or labels is None or x.numel() == 0:
        return x
    y = reference.resize_labels(labels.cpu(), x.shape[2:])
    ignored = (y == ignore_index).nonzero()
    if len(ignored) == 0:
        return x
    b, h, w = ignored[0 if where == "first" else len(ignored) // 2].tolist()
    spec["nan_pixel"] = [b, h, w]
    mask = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool)
    mask[b, 0, h, w] = True
    # a where() of the view: the NaN is a value, the gradient still flows to every other pixel
    return torch.where(mask.to(device), torch.full((), float("nan"), dtype=x.dtype, device=device), x)


def as_tokens(x):
    """[B, C, H, W] -> the [B, N, C] token view of the same memory."""
    return x.flatten(2).transpose(1, 2)


# ---- IDD and its building blocks -----------------------------------------------------


def _draw_pair(rng, same_size=False, min_channels=0, half=True):
    """Student and teacher feature descriptions: channels and (unless `same_size`) sizes may
    differ, and so may their value scales; one dtype for both."""
    B = draw_size(rng, 0, 3, empty=0.04)
    dtype = draw_dtype(rng, half)
    H, W = draw_size(rng, 0, 12), draw_size(rng, 0, 12)
    Ht, Wt = (H, W) if same_size or rng.random() < 0.6 else (draw_size(rng, 1, 12), draw_size(rng, 1, 12))
    if H * W == 0:
        Ht, Wt = H, W
    s = draw_feats(rng, (B, draw_size(rng, max(min_channels, 0), 12), H, W), dtype)
    t = draw_feats(rng, (B, draw_size(rng, max(min_channels, 1), 20), Ht, Wt), dtype,
                   scale=s["scale"] if rng.random() < 0.5 else draw_scale(rng))
    return s, t


def _draw_tokens(rng, p):
    """Token inputs: the student, or both when they tile the same grid (`size` is shared)."""
    same = p["student"]["shape"][2:] == p["teacher"]["shape"][2:]
    p["tokens"] = pick(rng, {"none": 8, "student": 1, "both": 1 if same else 0})


def _tokens(p, s, t):
    kw = {}
    if p.get("tokens", "none") != "none":
        kw["size"] = tuple(s.shape[2:])
        s = as_tokens(s)
        t = as_tokens(t) if p["tokens"] == "both" else t
    return s, t, kw


def _draw_idd(rng):
    s, t = _draw_pair(rng)
    K = draw_num_classes(rng)
    p = {"student": s, "teacher": t, "labels": draw_labels_for(rng, s, K), "K": K,
         "metric": rng.choice(("euclidean", "sqeuclidean", "cosine")), "normalize": rng.choice((None, "mean")),
         "reduction": rng.choice(REDUCTIONS), "eps": pick(rng, {1e-8: 5, 1e-3: 1}),
         "centroids": pick(rng, {"image": 4, "batch": 1})}
    _draw_tokens(rng, p)
    _nan_at_ignored(rng, p, "student")
    return p


def _build_pair(p, seed, device):
    y = make_labels(p["labels"], _sub(seed, 0), device)
    ig = p["labels"]["ignore_index"]
    s = build_feats(p, "student", _sub(seed, 1), device, True, y, ig)
    t = build_feats(p, "teacher", _sub(seed, 2), device, False, y, ig)
    return {"student": s, "teacher": t, "labels": y}


def _idd(module):
    def call(x, p):
        s, t, kw = _tokens(p, x["student"], x["teacher"])
        return {"loss": module.inter_class_distance_loss(
            s, t, x["labels"], p["K"], ignore_index=p["labels"]["ignore_index"], metric=p["metric"],
            normalize=p["normalize"], reduction=p["reduction"], eps=p["eps"], centroids=p["centroids"], **kw)}
    return call


def _idd_floor(p, x):
    """The first-order rounding of the centroid passes and the K x K math
    (distance_rounding.idd_rounding), in roundoffs of the case's precision; the half types' sums
    are float32 (METHOD.md 8)."""
    precision = least_precise([x["student"], x["teacher"]])
    student, teacher = (centroid_rounding(x[key], x["labels"], p["K"], p["labels"]["ignore_index"],
                                          p["centroids"] == "batch") for key in ("student", "teacher"))
    floors = idd_rounding(student, teacher, p["metric"], p["normalize"] == "mean", p["eps"], p["reduction"],
                          UNIT_ROUNDOFF[precision], math_unit(precision))
    floors = scaled_floors(floors, precision, precision)
    if p["metric"] == "euclidean" and coincident_classes(*student[:2]):
        floors["grad:student"] = float("inf")  # no gradient to compare (floors.coincident_classes)
    return floors


register(OpSpec("idd", _draw_idd, _build_pair, _idd(idd_ops), _idd(reference), grads=("student",),
                floor=_idd_floor))


def _draw_centroids(rng):
    B = draw_size(rng, 0, 3, empty=0.04)
    f = draw_feats(rng, (B, draw_size(rng, 0, 16), draw_size(rng, 0, 12), draw_size(rng, 0, 12)), draw_dtype(rng))
    K = draw_num_classes(rng)
    p = {"feats": f, "labels": draw_labels_for(rng, f, K), "K": K,
         "tokens": pick(rng, {False: 4, True: 1})}
    _nan_at_ignored(rng, p, "feats")
    return p


def _build_centroids(p, seed, device):
    y = make_labels(p["labels"], _sub(seed, 0), device)
    return {"feats": build_feats(p, "feats", _sub(seed, 1), device, True, y, p["labels"]["ignore_index"]),
            "labels": y}


def _centroids(module):
    def call(x, p):
        f, kw = x["feats"], {}
        if p["tokens"]:
            f, kw = as_tokens(f), {"size": tuple(f.shape[2:])}
        c, n = module.class_centroids(f, x["labels"], p["K"], ignore_index=p["labels"]["ignore_index"], **kw)
        return {"centroids": c, "counts": n}
    return call


register(OpSpec("class_centroids", _draw_centroids, _build_centroids, _centroids(idd_ops), _centroids(reference),
                grads=("feats",)))


def _draw_distance(rng):
    """Centroids as they come (any values) and counts with absent classes; close pairs now and
    then (the float64 K x K math exists for classes nearly merged: METHOD.md 8)."""
    B, K = draw_size(rng, 0, 3, empty=0.04), draw_num_classes(rng)
    dtype = draw_dtype(rng)
    return {"centroids": draw_feats(rng, (B, K, draw_size(rng, 0, 24)), dtype, layouts=("contiguous", "strided",
                                                                                          "offset", "expanded")),
            "present": pick(rng, {1.0: 2, 0.7: 2, 0.2: 1}), "close": pick(rng, {0: 3, 1e-3: 1, 1e-6: 1}),
            "metric": rng.choice(("euclidean", "sqeuclidean", "cosine")), "normalize": rng.choice((None, "mean")),
            "eps": pick(rng, {1e-8: 5, 1e-2: 1})}


def _build_distance(p, seed, device):
    c = make_feats(p["centroids"], _sub(seed, 1), device, grad=False)
    B, K = c.shape[:2]
    if p["close"] and K > 1 and c.numel():  # class 1 a small step from class 0
        step = p["close"] * (c[:, :1].detach().abs().amax(-1, keepdim=True) + 1e-30)
        c = torch.cat([c[:, :1], c[:, :1] + step, c[:, 2:]], 1)
    c = c.detach().requires_grad_()
    g = torch.Generator().manual_seed(_sub(seed, 2))
    counts = torch.randint(1, 50, (B, K), generator=g) * (torch.rand(B, K, generator=g) < p["present"])
    return {"centroids": c, "counts": counts.to(device)}


def _distance(module):
    def call(x, p):
        return {"dist": module.class_distance_matrix(x["centroids"], x["counts"], p["metric"], p["normalize"],
                                                     p["eps"])}
    return call


def _distance_floor(p, x):
    """The float64 math's first-order rounding (distance_rounding.matrix_rounding), whatever the
    centroids' dtype: the op casts its float64 results, which the relative tolerance covers."""
    floors = matrix_rounding(x["centroids"], x["counts"], p["metric"], p["normalize"] == "mean", p["eps"])
    return scaled_floors(floors, "float64", least_precise([x["centroids"]]))


register(OpSpec("class_distance_matrix", _draw_distance, _build_distance, _distance(idd_ops), _distance(reference),
                grads=("centroids",), floor=_distance_floor))


from . import baseline_cases  # noqa: E402,F401  (registers the baselines' and the position loss's cases)

PUBLIC = tuple(OPS)  # the public functions (registered above and in baseline_cases); the raw ops come next

from . import raw_ops  # noqa: E402,F401  (registers the raw ops)

RAW = tuple(name for name in OPS if name not in PUBLIC)
