"""Random cases of the raw ops with CUDA kernels (torch.ops.idd_ops.*), at arguments the public
functions never pass: the centroid op on any layout (the public function takes the class-sum
path for channels_last on the CPU), class sums and the fused IDD tail of any dtype, the cosine
ops with centroids that are not the features' means, softmax-KL over any [outer, length,
inner] view. Position and SKD are left to their public functions, which pass the op every
argument it has. Registered into cases.OPS (imported from cases.py).
"""
import torch

from idd_ops import reference

from .baseline_cases import draw_logit_pair
from .cases import OpSpec, _draw_pair, _sub, build_feats, register
from .distance_rounding import tail_rounding
from .floors import UNIT_ROUNDOFF, floor_of, least_precise, math_unit, near_cosine_floor, scaled_floors
from .inputs import (draw_dtype, draw_feats, draw_labels, draw_labels_for, draw_num_classes, draw_size, make_feats,
                     make_labels, pick)

ops = torch.ops.idd_ops


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _draw_feats_labels(rng):
    B = draw_size(rng, 0, 3, empty=0.04)
    f = draw_feats(rng, (B, draw_size(rng, 0, 16), draw_size(rng, 0, 12), draw_size(rng, 0, 12)),
                   draw_dtype(rng))
    K = draw_num_classes(rng)
    return {"feats": f, "labels": draw_labels_for(rng, f, K), "K": K}


def _build_feats_labels(p, seed, device):
    y = make_labels(p["labels"], _sub(seed, 0), device)
    return {"feats": build_feats(p, "feats", _sub(seed, 1), device, True, y, p["labels"]["ignore_index"]),
            "labels": y}


def _slots(labels, size, p):
    """The class-slot map of the labels, from the reference (int16, as the ops take it)."""
    return reference.label_slots(labels.cpu(), size, p["K"], p["labels"]["ignore_index"]).to(torch.int16).to(
        labels.device)


# ---- class_centroids, _label_slots, class_sums, class_sums_pair ----------------------


def _centroids_op(x, p):
    c, n = ops.class_centroids(x["feats"], x["labels"], p["K"], p["labels"]["ignore_index"])
    return {"centroids": c, "counts": n}


def _centroids_ref(x, p):
    c, n = reference._centroids(x["feats"], x["labels"], p["K"], p["labels"]["ignore_index"])
    return {"centroids": c, "counts": n}


register(OpSpec("op.class_centroids", _draw_feats_labels, _build_feats_labels, _centroids_op, _centroids_ref,
                grads=("feats",)))


def _draw_slots(rng):
    B, K = draw_size(rng, 0, 3, empty=0.04), draw_num_classes(rng)
    H, W = draw_size(rng, 0, 40), draw_size(rng, 0, 40)
    return {"labels": draw_labels(rng, B, K, (H, W), resize=0.8), "size": [H, W], "K": K}


register(OpSpec(
    "op._label_slots", _draw_slots, lambda p, seed, device: {"labels": make_labels(p["labels"], seed, device)},
    lambda x, p: {"slots": ops._label_slots(x["labels"], *p["size"], p["K"], p["labels"]["ignore_index"]).long()},
    lambda x, p: {"slots": reference.label_slots(x["labels"], p["size"], p["K"], p["labels"]["ignore_index"])}))


def _build_sums(p, seed, device):
    x = _build_feats_labels(p, seed, device)
    return {"feats": x["feats"], "slots": _slots(x["labels"], x["feats"].shape[2:], p)}


register(OpSpec(
    "op.class_sums", _draw_feats_labels, _build_sums,
    lambda x, p: dict(zip(("sums", "counts"), ops.class_sums(x["feats"], x["slots"], p["K"]))),
    lambda x, p: dict(zip(("sums", "counts"), reference.class_sums(x["feats"], x["slots"].long(), p["K"]))),
    grads=("feats",)))


def _draw_sums_pair(rng):
    a, b = _draw_pair(rng, min_channels=0)
    K = draw_num_classes(rng)
    return {"a": a, "b": b, "labels": draw_labels_for(rng, a, K), "K": K}


def _build_sums_pair(p, seed, device):
    y = make_labels(p["labels"], _sub(seed, 0), device)
    a = make_feats(p["a"], _sub(seed, 1), device, True)
    b = make_feats(p["b"], _sub(seed, 2), device, True)
    return {"a": a, "b": b, "slots_a": _slots(y, a.shape[2:], p), "slots_b": _slots(y, b.shape[2:], p)}


def _sums_pair_ref(x, p):
    sa, na = reference.class_sums(x["a"], x["slots_a"].long(), p["K"])
    sb, nb = reference.class_sums(x["b"], x["slots_b"].long(), p["K"])
    return {"sums_a": sa, "counts_a": na, "sums_b": sb, "counts_b": nb}


register(OpSpec(
    "op.class_sums_pair", _draw_sums_pair, _build_sums_pair,
    lambda x, p: dict(zip(("sums_a", "counts_a", "sums_b", "counts_b"),
                          ops.class_sums_pair(x["a"], x["slots_a"], x["b"], x["slots_b"], p["K"]))),
    _sums_pair_ref, grads=("a", "b")))


# ---- idd_tail ---------------------------------------------------------------------------


def _draw_tail(rng):
    """Class sums as the class-sum pass gives them (count x centroid, float64, or float32), with
    absent classes (count 0, sum 0), classes nearly merged, and the dtype of the K x K math and
    of the loss both chosen (the library asks for float64; the op takes float32 too)."""
    B, K = draw_size(rng, 0, 3, empty=0.04), draw_num_classes(rng)
    dtype = pick(rng, {"float64": 3, "float32": 1})
    math = pick(rng, {None: 1, "float64": 2, "float32": 1})
    s = draw_feats(rng, (B, K, draw_size(rng, 0, 24)), dtype, layouts=("contiguous", "strided", "offset"))
    t = draw_feats(rng, (B, K, draw_size(rng, 0, 24)), dtype, layouts=("contiguous",))
    p = {"student": s, "teacher": t, "present": pick(rng, {1.0: 2, 0.7: 2, 0.3: 1}),
         "close": pick(rng, {0: 3, 1e-3: 1}), "metric": rng.choice(("euclidean", "sqeuclidean", "cosine")),
         "normalize": rng.choice((False, True)), "eps": pick(rng, {1e-8: 5, 1e-3: 1}),
         "reduction": rng.choice(("mean", "sum", "none")), "dtype": math,
         "loss_dtype": pick(rng, {None: 2, "float32": 1, "float64": 1})}
    # a float32 K x K math (asked, or by default from float32 sums) or loss rounds as float32 does
    low = math == "float32" or (math is None and dtype == "float32") or p["loss_dtype"] == "float32"
    p["precision"] = "float32" if low else dtype
    return p


def _build_tail(p, seed, device):
    x = {}
    for k, key in enumerate(("student", "teacher")):
        c = make_feats(p[key], _sub(seed, k + 1), "cpu")
        B, K = c.shape[:2]
        if p["close"] and K > 1 and c.numel():
            c = torch.cat([c[:, :1], c[:, :1] * (1 + p["close"]), c[:, 2:]], 1)
        g = torch.Generator().manual_seed(_sub(seed, k + 5))
        n = torch.randint(1, 200, (B, K), generator=g) * (torch.rand(B, K, generator=g) < p["present"])
        sums = (c.double() * n[..., None]).to(c.dtype).to(device)
        x[key], x[key[0] + "_counts"] = sums, n.to(device)
    x["student"].requires_grad_(True)
    return x


def _dtype(name):
    return None if name is None else getattr(torch, name)


def _tail_op(x, p):
    loss, _, _ = ops.idd_tail(x["student"], x["s_counts"], x["teacher"], x["t_counts"], p["metric"], p["normalize"],
                              p["eps"], p["reduction"], _dtype(p["dtype"]), _dtype(p["loss_dtype"]))
    return {"loss": loss}


def _tail_ref(x, p):
    """METHOD.md 3-4 from centroids = sums / counts, as reference.inter_class_distance_loss does
    after its class pass (the reference has no entry point taking sums)."""
    normalize = "mean" if p["normalize"] else None
    ds, dt = (reference.class_distance_matrix(x[key] / x[key[0] + "_counts"].clamp_min(1)[..., None],
                                              x[key[0] + "_counts"], p["metric"], normalize, p["eps"])
              for key in ("student", "teacher"))
    K = ds.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool).triu(1)
    valid = reference._valid_entries(x["s_counts"]) & reference._valid_entries(x["t_counts"]) & upper
    err = torch.where(valid, (ds - dt).pow(2), torch.zeros_like(ds))
    per_image, n = err.sum((1, 2)), valid.sum((1, 2))
    loss = {"sum": per_image.sum(), "none": per_image / n.clamp_min(1),
            "mean": per_image.sum() / n.sum().clamp_min(1)}[p["reduction"]]
    return {"loss": loss}


def _tail_floor(p, x):
    """The K x K math's first-order rounding (distance_rounding.tail_rounding) in roundoffs of the
    case's precision: of that math where it sets the precision, scaled down where only a float32
    loss does."""
    math = p["dtype"] or str(x["student"].dtype).removeprefix("torch.")
    floors = tail_rounding(x["student"], x["s_counts"], x["teacher"], x["t_counts"], p["metric"], p["normalize"],
                           p["eps"], p["reduction"], UNIT_ROUNDOFF[math])
    return scaled_floors(floors, math, p["precision"])


register(OpSpec("op.idd_tail", _draw_tail, _build_tail, _tail_op, _tail_ref, grads=("student",), floor=_tail_floor))


# ---- the cosine ops (IFVD) -------------------------------------------------------------


def _draw_cosine(rng):
    p = _draw_feats_labels(rng)
    # the features' own class means (cosines near 1, IFVD's case) or unrelated centroids
    p["centroids"] = pick(rng, {"means": 2, "random": 1})
    p["eps"] = pick(rng, {1e-8: 5, 1e-3: 1})
    return p


def _build_cosine(p, seed, device, means_only=False):
    x = _build_feats_labels(p, seed, device)
    f = x["feats"].detach()
    acc = _acc(f.dtype)
    if p["centroids"] == "means" or means_only:
        c, n = reference._centroids(f.cpu().to(acc), x["labels"].cpu(), p["K"], p["labels"]["ignore_index"])
        x["counts"] = n.to(device)
    else:
        B, C = f.shape[:2]
        c = make_feats({"shape": [B, p["K"], C], "dtype": "float64", "layout": "contiguous",
                        "scale": p["feats"]["scale"], "offset": p["feats"]["offset"]}, _sub(seed, 3))
    x["centroids"] = c.to(device=device, dtype=acc).requires_grad_(not means_only)
    x["slots"] = _slots(x["labels"], f.shape[2:], p)
    return x


def _cosine_op(x, p):
    return {"cos": ops.pixel_centroid_cosine(x["feats"], x["centroids"], x["labels"], p["labels"]["ignore_index"],
                                             p["eps"])[0]}


def _cosine_ref(x, p):
    return {"cos": reference.pixel_centroid_cosine(x["feats"], x["centroids"], x["slots"].long(), p["eps"])}


def _cosine_floor(p, x):
    f = floor_of("cos", "none", ("feats",), x)
    f.update(floor_of("cos", "none", ("centroids",), x, dim=2))
    if p.get("with_counts") and "grad:centroids" in f:
        # the features' gradient also comes through their class means, in terms of size 1 / |centroid|
        # (a mean far shorter than its pixels where their values cancel)
        f["grad:feats"] = max(f.get("grad:feats", 0.0), f["grad:centroids"])
    if "grad:centroids" in f:  # a centroid's gradient sums the terms of every pixel of its class
        f["grad:centroids"] *= max(1, x["feats"][0, 0].numel())
    if near_cosine_floor(x["feats"], x["centroids"], x["slots"], p["eps"], math_unit(least_precise([x["feats"]]))):
        f.update({"grad:feats": float("inf"), "grad:centroids": float("inf")})  # floors.near_cosine_floor
    return f


register(OpSpec("op.pixel_centroid_cosine", _draw_cosine, _build_cosine, _cosine_op, _cosine_ref,
                grads=("feats", "centroids"), floor=_cosine_floor))


def _draw_cosine_slots(rng):
    p = _draw_cosine(rng)
    # with counts the centroids must be the features' own means: the op's gradient then carries
    # the path through them (IFVD's student)
    p["with_counts"] = rng.random() < 0.5
    if p["with_counts"]:
        p["centroids"] = "means"
    return p


def _build_cosine_slots(p, seed, device):
    return _build_cosine(p, seed, device, means_only=p["with_counts"])


def _cosine_slots_op(x, p):
    counts = x["counts"] if p["with_counts"] else None
    return {"cos": ops._pixel_centroid_cosine_slots(x["feats"], x["centroids"], x["slots"], p["eps"], counts)[0]}


def _cosine_slots_ref(x, p):
    c = x["centroids"]
    if p["with_counts"]:  # the centroids as a function of the features: their gradient flows back
        c = reference._class_sums(x["feats"], x["slots"].long(), p["K"])[0] / x["counts"].clamp_min(1)[..., None]
    return {"cos": reference.pixel_centroid_cosine(x["feats"], c, x["slots"].long(), p["eps"])}


register(OpSpec("op._pixel_centroid_cosine_slots", _draw_cosine_slots, _build_cosine_slots, _cosine_slots_op,
                _cosine_slots_ref, grads=("feats", "centroids"), floor=_cosine_floor))


# ---- softmax_kl -------------------------------------------------------------------------


def _draw_softmax_kl(rng):
    """[outer, length, inner] views: pixel KD's (classes along length, pixels inner), CWD's
    (pixels along length, inner 1) and anything between, long vectors included."""
    return draw_logit_pair(rng, (draw_size(rng, 0, 6), draw_size(rng, 0, 70), draw_size(rng, 0, 9)))


def _kl_ref(x, p):
    T = p["temperature"]
    return {"kl": reference._kl_rows(x["student"] / T, x["teacher"] / T, 1)}


register(OpSpec(
    "op.softmax_kl", _draw_softmax_kl,
    lambda p, seed, device: {"student": make_feats(p["student"], _sub(seed, 1), device, True),
                             "teacher": make_feats(p["teacher"], _sub(seed, 2), device)},
    lambda x, p: {"kl": ops.softmax_kl(x["student"], x["teacher"], p["temperature"])[0]},
    _kl_ref, grads=("student",)))
