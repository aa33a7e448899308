"""Plain-PyTorch versions of every idd_ops loss and building block: readable, unfused, the tests'
truth. They depend on torch alone and import without the compiled library.

They follow METHOD.md literally: labels are resized by F.interpolate's nearest rule, classes
become a one-hot mask, and autograd differentiates everything. Arguments, defaults and reductions are
those of the fused functions (see their docstrings).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._dtypes import acc_dtype, loss_dtype
from ._nearest import resize_nearest
from ._position_maps import position_maps
from ._reduction import reduce


def resize_labels(labels, size):
    """Labels ``[B, Hy, Wy]`` -> ``[B, H, W]`` (int64) by nearest neighbour: the rows and columns
    ``F.interpolate(labels[:, None].float(), size, mode="nearest")`` picks (METHOD.md 1), the
    values as they are."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    if 0 in tuple(size):  # nothing to pick
        return labels.new_zeros((labels.shape[0], *size), dtype=torch.long)
    return resize_nearest(labels, size).long()


def _kl_rows(s, t, dim):
    """KL(softmax(t) || softmax(s)) along dim; a class the teacher gives probability 0 adds 0.
    A vector with a NaN logit on either side: NaN. Else one with no finite teacher logit has no
    mass to match: 0. Else one with no finite student logit: +inf. Both with zero gradient
    (METHOD.md, "-inf logits")."""
    def no_mass(x):
        return (x == float("-inf")).all(dim, keepdim=True)
    t_none, s_none = no_mass(t), no_mass(s)
    # softmax of such a vector is 0/0: take it of zeros, then mask, so no NaN reaches autograd
    pt = F.softmax(torch.where(t_none, torch.zeros_like(t), t), dim)
    log_ps = F.log_softmax(torch.where(s_none, torch.zeros_like(s), s), dim)
    log_ps = torch.where(s_none, torch.full_like(log_ps, float("-inf")), log_ps)
    # a teacher -inf adds 0; a finite teacher logit over a student -inf adds +inf, also where its
    # probability rounds to 0 (it is > 0 all the same). A NaN logit is kept and makes the sum NaN.
    keep = t != float("-inf")  # (no entry of a t_none vector)
    term = pt * (F.log_softmax(torch.where(t_none, torch.zeros_like(t), t), dim) - log_ps)
    term = torch.where((pt == 0) & (log_ps == float("-inf")), torch.full_like(term, float("inf")), term)
    kl = torch.where(keep, term, torch.zeros_like(term)).sum(dim)
    has_nan = (s.isnan() | t.isnan()).any(dim, keepdim=True)
    # NaN in value and gradient, through the student's own logits: the branches above may pass
    # it no gradient (an all -inf student's); where() keeps the other vectors' gradient NaN-free
    nan = (torch.where(has_nan, s, torch.zeros_like(s)) * float("nan")).sum(dim)
    return torch.where(has_nan.squeeze(dim), nan, kl)


def label_slots(labels, size, num_classes, ignore_index=255):
    """Class slot of every pixel of ``labels`` resized to ``size``: ``[B, H, W]`` int64, the class
    in ``[0, K)`` or -1 for ``ignore_index`` (reference of the ``_label_slots`` op)."""
    y = resize_labels(labels, size)
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if bad.any():
        raise ValueError(f"labels: value {y[bad][0].item()} is outside [0, num_classes={num_classes}) "
                         f"and is not ignore_index={ignore_index}")
    return torch.where(y == ignore_index, torch.full_like(y, -1), y)


def class_sums(features, slots, num_classes):
    """Per-image class sums ``[B, K, C]`` float64 and counts ``[B, K]`` of features
    ``[B, C, H, W]`` under class slots ``[B, H, W]`` (reference of the ``class_sums`` op; summed
    in the accumulation dtype, as the reference's centroids are)."""
    sums, counts = _class_sums(features, slots, num_classes)
    return sums.double(), counts


def _class_sums(features, slots, num_classes):
    B, C, H, W = features.shape
    slot = slots.reshape(B, H * W).long()
    slot = torch.where(slot < 0, torch.full_like(slot, num_classes), slot)
    onehot = F.one_hot(slot, num_classes + 1)[..., :num_classes].to(acc_dtype(features.dtype))  # [B, HW, K]
    counts = onehot.sum(1)
    # ignored pixels zeroed first: in the one-hot product a NaN or inf there would reach every
    # class (0 * NaN), where S_bk sums the pixels of class k alone (METHOD.md 2)
    f = features.reshape(B, C, H * W).to(onehot.dtype)
    valid = (slot < num_classes)[:, None, :]
    f = torch.where(valid, f, torch.zeros((), dtype=f.dtype, device=f.device))
    if not _tf32_may_round(f):
        return torch.einsum("bpk,bcp->bkc", onehot, f), counts.long()
    # TF32 would round the features to 10 mantissa bits inside the one-hot product (a GEMM): it
    # sums them less a per-channel pivot (their mean over the image's labelled pixels, a
    # constant; the zeros at ignored pixels would pull it off the features' offset), so that
    # rounding scales with the features' spread, not with a common offset (METHOD.md 8)
    pivot = f.detach().sum(2, keepdim=True) / counts.sum(1).clamp_min(1)[:, None, None]  # [B, C, 1]
    sums = torch.einsum("bpk,bcp->bkc", onehot, f - pivot)
    return sums + counts[..., None] * pivot.transpose(1, 2), counts.long()


def _tf32_may_round(x):
    """Whether a float32 GEMM on x may run in TF32 (torch.backends.cuda.matmul.allow_tf32 or
    set_float32_matmul_precision below "highest"). The tests patch it to check the pivot's math
    on the CPU."""
    return x.is_cuda and x.dtype == torch.float32 and (
        torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest")


def _maps(size, *inputs):
    """Each [B, N, C] token input with size=(H, W) as the [B, C, H, W] map it stands for (a
    view), maps as they are; a size that no input takes is an error, as in the fused functions."""
    if size is None:
        return inputs
    if all(x.dim() != 3 for x in inputs):
        raise ValueError("size: only [B, N, C] token inputs take a size")
    return tuple(x.transpose(1, 2).unflatten(2, tuple(size)) if x.dim() == 3 else x for x in inputs)


def _centroids(features, labels, num_classes, ignore_index):
    slots = label_slots(labels, features.shape[2:], num_classes, ignore_index)
    sums, counts = _class_sums(features, slots, num_classes)
    return sums / counts.clamp_min(1)[..., None].to(sums.dtype), counts


def class_centroids(feats, labels, num_classes, ignore_index=255, size=None):
    """Reference of :func:`idd_ops.class_centroids`."""
    centroids, counts = _centroids(*_maps(size, feats), labels, num_classes, ignore_index)
    return centroids.to(feats.dtype), counts


def _valid_entries(counts):
    present = counts > 0
    K = counts.shape[1]
    off_diag = ~torch.eye(K, dtype=torch.bool, device=counts.device)
    return present[:, :, None] & present[:, None, :] & off_diag


def class_distance_matrix(centroids, counts, metric="euclidean", normalize=None, eps=1e-8):
    """Reference of :func:`idd_ops.class_distance_matrix`."""
    c = centroids.to(acc_dtype(centroids.dtype))
    valid = _valid_entries(counts)
    if metric == "cosine":
        norm = torch.linalg.vector_norm(c, dim=-1)
        denom = (norm[:, :, None] * norm[:, None, :]).clamp_min(eps)
        # products summed elementwise, not through a GEMM that TF32 would round
        d = 1 - (c[:, :, None, :] * c[:, None, :, :]).sum(-1) / denom
    else:
        sq = (c[:, :, None, :] - c[:, None, :, :]).pow(2).sum(-1)
        if metric == "sqeuclidean":
            d = sq
        else:  # euclidean; the where() keeps the gradient at zero distance at 0, and sq * 0 a NaN
            d = torch.where(sq > 0, torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt(), sq * 0)
    d = torch.where(valid, d, torch.zeros_like(d))
    if normalize == "mean":
        n = valid.sum((1, 2))
        mean = d.sum((1, 2)) / n.clamp_min(1)
        m = torch.where(n > 0, mean.clamp_min(eps), torch.ones_like(mean))
        d = d / m[:, None, None]
    return d.to(centroids.dtype)


def inter_class_distance_loss(student_feats, teacher_feats, labels, num_classes, ignore_index=255,
                              metric="euclidean", normalize=None, reduction="mean", eps=1e-8, centroids="image",
                              size=None):
    """Reference of :func:`idd_ops.inter_class_distance_loss` (``centroids="batch"`` within one
    process: the fused function's ``process_group`` result equals this on the global batch)."""
    student_feats, teacher_feats = _maps(size, student_feats, teacher_feats)
    cs, ns = _centroids(student_feats, labels, num_classes, ignore_index)
    ct, nt = _centroids(teacher_feats.detach(), labels, num_classes, ignore_index)
    if centroids == "batch":  # per-class means over every pixel of the batch
        cs, ns = (cs * ns[..., None]).sum(0, keepdim=True) / ns.sum(0).clamp_min(1)[None, :, None], ns.sum(0)[None]
        ct, nt = (ct * nt[..., None]).sum(0, keepdim=True) / nt.sum(0).clamp_min(1)[None, :, None], nt.sum(0)[None]
    ds = class_distance_matrix(cs, ns, metric, normalize, eps)
    dt = class_distance_matrix(ct, nt, metric, normalize, eps).to(ds.dtype)
    upper = torch.ones(num_classes, num_classes, dtype=torch.bool, device=ds.device).triu(1)
    valid = _valid_entries(ns) & _valid_entries(nt) & upper
    err = torch.where(valid, (ds - dt).pow(2), torch.zeros_like(ds))
    per_image, n = err.sum((1, 2)), valid.sum((1, 2))
    if reduction == "sum":
        loss = per_image.sum()
    elif reduction == "none":
        loss = per_image / n.clamp_min(1)
    else:
        loss = per_image.sum() / n.sum().clamp_min(1)
    return loss.to(loss_dtype(student_feats))


def position_encoding_loss(pred_maps, kinds, reduction="mean", num_frequencies=2, num_stripes=4, sigma=0.25):
    """Reference of :func:`idd_ops.position_encoding_loss`: materialise the maps, then MSE."""
    maps = position_maps(kinds, pred_maps.shape[2], pred_maps.shape[3], dtype=acc_dtype(pred_maps.dtype),
                         device=pred_maps.device, num_frequencies=num_frequencies, num_stripes=num_stripes,
                         sigma=sigma)
    err = F.mse_loss(pred_maps.to(maps.dtype), maps.expand(pred_maps.shape[0], -1, -1, -1), reduction="none")
    return reduce(err, reduction).to(loss_dtype(pred_maps))


def pixel_kd_loss(student_logits, teacher_logits, labels: Optional[torch.Tensor] = None, temperature=1.0,
                  ignore_index=255, reduction="mean"):
    """Reference of :func:`idd_ops.pixel_kd_loss`."""
    acc = acc_dtype(student_logits.dtype)
    s, t = student_logits.to(acc) / temperature, teacher_logits.detach().to(acc) / temperature
    kl = _kl_rows(s, t, 1)  # [B, H, W]
    count = None
    if labels is not None:
        keep = resize_labels(labels, kl.shape[1:]) != ignore_index
        kl = torch.where(keep, kl, torch.zeros_like(kl))
        count = keep.sum()
    return (reduce(kl, reduction, count) * temperature ** 2).to(loss_dtype(student_logits))


def channel_wise_distillation_loss(student_feats, teacher_feats, temperature=4.0, reduction="mean"):
    """Reference of :func:`idd_ops.channel_wise_distillation_loss`."""
    acc = acc_dtype(student_feats.dtype)
    s = student_feats.to(acc).flatten(2) / temperature
    t = teacher_feats.detach().to(acc).flatten(2) / temperature
    kl = _kl_rows(s, t, 2)  # [B, C]
    return (reduce(kl, reduction) * temperature ** 2).to(loss_dtype(student_feats))


def structural_kd_loss(student_feats, teacher_feats, pool=2, reduction="mean"):
    """Reference of :func:`idd_ops.structural_kd_loss`: forms the [B, P, P] affinities."""
    def affinity(x):
        if pool > 1 and x.shape[2] * x.shape[3] > 0:  # max_pool2d rejects an empty map
            x = F.max_pool2d(x, kernel_size=pool, stride=pool, ceil_mode=True)
        x = F.normalize(x.to(acc_dtype(x.dtype)).flatten(2), dim=1)
        return x.transpose(1, 2) @ x
    err = (affinity(student_feats) - affinity(teacher_feats.detach())).pow(2)  # [B, P, P]
    if reduction == "none":
        per_image = err.flatten(1).mean(1) if err.shape[1] else err.new_zeros(err.shape[0])
        return per_image.to(loss_dtype(student_feats))
    return reduce(err, reduction).to(loss_dtype(student_feats))


def pixel_centroid_cosine(feats, centroids, slots, eps=1e-8):
    """IFVD's map ``[B, H, W]`` (accumulation dtype): the cosine similarity of each pixel's feature
    (``feats [B, C, H, W]``) to its class centroid (``centroids [B, K, C]``) under class slots
    ``[B, H, W]`` (-1: ignored, which scores 1), ``<f, c> / max(|f| |c|, eps)`` (reference of the
    ``_pixel_centroid_cosine_slots`` op, and with :func:`label_slots` of ``pixel_centroid_cosine``)."""
    B, C, H, W = feats.shape
    acc = torch.promote_types(acc_dtype(feats.dtype), centroids.dtype)
    valid = slots >= 0
    slot = torch.where(valid, slots, torch.zeros_like(slots)).long()
    # ignored pixels zeroed: their cosine is replaced by 1, and a NaN or inf there would otherwise
    # reach the centroids' gradient through it (0 * NaN)
    f = torch.where(valid[:, None], feats.to(acc), torch.zeros((), dtype=acc, device=feats.device))
    c = torch.gather(centroids.to(acc), 1, slot.reshape(B, H * W, 1).expand(-1, -1, C))  # [B, HW, C]
    c = c.transpose(1, 2).reshape(B, C, H, W)
    denom = (torch.linalg.vector_norm(f, dim=1) * torch.linalg.vector_norm(c, dim=1)).clamp_min(eps)
    cos = (f * c).sum(1) / denom
    return torch.where(valid, cos, torch.ones_like(cos))


def intra_class_variation_loss(student_feats, teacher_feats, labels, num_classes, ignore_index=255, eps=1e-8,
                               reduction="mean", size=None):
    """Reference of :func:`idd_ops.intra_class_variation_loss`."""
    student_feats, teacher_feats = _maps(size, student_feats, teacher_feats)

    def cosine_map(feats):
        slots = label_slots(labels, feats.shape[2:], num_classes, ignore_index)
        return pixel_centroid_cosine(feats, _centroids(feats, labels, num_classes, ignore_index)[0], slots, eps)
    ms, mt = cosine_map(student_feats), cosine_map(teacher_feats.detach())
    return reduce((ms - mt).pow(2), reduction).to(loss_dtype(student_feats))
