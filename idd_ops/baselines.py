"""Baseline segmentation-KD losses, fused, with the conventions of the CIRKD code base at their
defaults so that published numbers stay comparable (METHOD.md section 7):

- pixel_kd_loss: per-pixel KL over classes at temperature T, times T^2, / (B*H*W)
- channel_wise_distillation_loss (CWD): per-channel softmax over pixels at T, KL, / (B*C) * T^2
- structural_kd_loss (SKD): pairwise-affinity MSE through C x C Gram products (differenced form)
- intra_class_variation_loss (IFVD): MSE between student and teacher maps of each pixel's cosine
  similarity to its class centroid

Every loss takes ``reduction="mean"|"sum"|"none"``; each docstring says what an element is and
what ``"none"`` returns. Teachers are constants: no gradient reaches them. Losses come in the
student's dtype (float32 for half inputs under autocast).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops  # noqa: F401  (registers autograd and fake kernels)
from . import _switches
from . import _validation as v
from ._dtypes import acc_dtype, loss_dtype
from ._class_sums import MAX_SLOT_CLASSES, detached_centroids, pair_sums, slots_for, uses_class_sums
from ._label_mask import kept_pixels
from ._reduction import reduce

ops = torch.ops.idd_ops


def pixel_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                  temperature: float = 1.0, ignore_index: int = 255, reduction: str = "mean") -> Tensor:
    """Pixel-wise KD: ``KL(softmax(t / T) || softmax(s / T))`` over the K classes of every pixel,
    times ``T^2``. A class with teacher probability 0 (logit ``-inf``) contributes 0.

    Args:
        student_logits, teacher_logits: ``[B, K, H, W]`` floating, same shape.
        labels: optional ``[B, Hy, Wy]`` integer map (resized by nearest neighbour to ``H x W``
            when its size differs). When given, pixels labelled ``ignore_index`` are left out;
            every other label must lie in ``[0, K)`` (for K <= 32767 a ValueError names
            ``labels`` otherwise on the CPU). Default: None (every pixel counts: CIRKD's convention).
        temperature: T > 0. Default: 1.0.
        ignore_index: label of pixels to leave out. Default: 255.
        reduction: ``"mean"`` (default): sum over the kept pixels divided by their number
            (``B*H*W`` without labels); ``"sum"``; ``"none"``: ``[B, H, W]`` per-pixel values
            (0 at ignored pixels).

    Returns:
        A scalar, or ``[B, H, W]`` for ``"none"``.
    """
    v.check_features("student_logits", student_logits)
    v.check_features("teacher_logits", teacher_logits)
    v.check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    v.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits,
                       "pixel KD compares class distributions pixel by pixel: resize the teacher's logits to the "
                       "student's size first (both must have K classes)")
    v.check_temperature(temperature)
    v.check_int("ignore_index", ignore_index)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    B, K, H, W = student_logits.shape
    if labels is not None:
        v.check_labels(labels, "student_logits", student_logits)
    if reduction != "none" and _switches.pixel_kd_sum_path(student_logits.device) and 0 < K <= MAX_SLOT_CLASSES:
        # the KL of the kept pixels summed and scaled inside one op
        slots = None if labels is None else ops._label_slots(labels, H, W, K, ignore_index).view(B, H * W)
        loss = ops._pixel_kd_sum(student_logits.reshape(B, K, H * W), teacher_logits.detach().reshape(B, K, H * W),
                                 slots, float(temperature), reduction == "mean")[0]
        return loss.to(loss_dtype(student_logits))
    kl = ops.softmax_kl(student_logits.reshape(B, K, H * W), teacher_logits.detach().reshape(B, K, H * W),
                        float(temperature))[0].reshape(B, H, W)
    count = None
    if labels is not None:
        keep = kept_pixels(labels, H, W, K, ignore_index)
        kl = torch.where(keep, kl, 0.0)
        count = keep.sum()
    return reduce(kl, reduction, count, temperature ** 2).to(loss_dtype(student_logits))


def channel_wise_distillation_loss(student_feats: Tensor, teacher_feats: Tensor, temperature: float = 4.0,
                                   reduction: str = "mean") -> Tensor:
    """Channel-wise distillation (CWD): for each (image, channel), softmax over the H*W pixels at
    temperature T; ``KL(teacher || student)`` summed over pixels, times ``T^2``. A pixel with
    teacher probability 0 (value ``-inf``) contributes 0.

    Args:
        student_feats, teacher_feats: ``[B, C, H, W]``, same shape. Where channel counts differ,
            use :class:`idd_ops.nn.ChannelWiseDistillationLoss`, which adds a 1x1 adapter (and
            chooses which channel count ``"mean"`` divides by).
        temperature: T > 0. Default: 4.0.
        reduction: ``"mean"`` (default): sum divided by ``B*C``; ``"sum"``; ``"none"``:
            ``[B, C]`` per-channel values.
    """
    v.check_features("student_feats", student_feats)
    v.check_features("teacher_feats", teacher_feats)
    v.check_pair(student_feats, teacher_feats)
    v.check_same_shape("student_feats", student_feats, "teacher_feats", teacher_feats,
                       "CWD compares channel by channel: adapt the student's channels with a 1x1 conv "
                       "(idd_ops.nn.ChannelWiseDistillationLoss(student_channels, teacher_channels) has one) "
                       "and match the spatial size")
    v.check_temperature(temperature)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    B, C, H, W = student_feats.shape
    rows = (student_feats.reshape(B * C, H * W, 1), teacher_feats.detach().reshape(B * C, H * W, 1))
    if reduction != "none" and _switches.pixel_kd_sum_path(student_feats.device):
        # the rows' KL summed and scaled inside one op (pixel KD's, over [B*C, H*W, 1] vectors)
        loss = ops._pixel_kd_sum(*rows, None, float(temperature), reduction == "mean")[0]
        return loss.to(loss_dtype(student_feats))
    kl = ops.softmax_kl(*rows, float(temperature))[0].reshape(B, C)
    return reduce(kl, reduction, scale=temperature ** 2).to(loss_dtype(student_feats))


def structural_kd_loss(student_feats: Tensor, teacher_feats: Tensor, pool: int = 2, reduction: str = "mean") -> Tensor:
    """Structural KD (pairwise affinity): ``pool x pool`` max pooling (ceil mode), L2
    normalisation over channels, affinity ``A = F^T F`` over the P pooled pixels, squared error
    ``(A_S - A_T)^2`` per affinity entry.

    The P x P affinities are never formed. On the CPU the op works through C x C Gram products
    in a differenced form: one block of pooled pixels at a time (a pass for the means, then one
    for the Grams), both networks' features are pooled and normalised in float64, their
    difference ``D = F_S - F_T`` is taken there (the narrower network padded with zero
    channels, which leaves its affinity unchanged), both are
    centred on the image's mean directions (so that an offset the features share does not round
    the Grams: docs/METHOD.md 8), and the Grams ``X X^T``, ``X D^T``, ``D D^T`` of the centred
    ``X``, ``D`` are accumulated in the accumulation dtype (float32 for float32/half inputs;
    on CUDA, bfloat16 inputs keep their dtype as the GEMMs' operands, on tensor cores); the value is a sum of their inner products in which every term
    carries a Gram of D, plus the means' own terms, so it stays accurate as the student nears the
    teacher and with a common offset, for equal and different channel counts alike, and so does
    the gradient. Extra memory: O(B*C*C) for the Grams plus one block's copies, never O(B*C*P)
    pooled copies nor O(B*P*P). The CUDA path is described in docs/ARCHITECTURE.md.

    Args:
        student_feats: ``[B, Cs, H, W]``; teacher_feats: ``[B, Ct, H, W]`` (channels may differ,
            spatial sizes must match).
        pool: pooling window and stride; 1 for none. Default: 2.
        reduction: ``"mean"`` (default, over all ``B*P*P`` entries); ``"sum"``; ``"none"``:
            ``[B]``, each image's mean over its ``P*P`` entries (the affinity is never formed,
            so there is no per-entry output).
    """
    v.check_features("student_feats", student_feats)
    v.check_features("teacher_feats", teacher_feats)
    v.check_pair(student_feats, teacher_feats)
    v.check_int("pool", pool, 1)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_same_size(student_feats, teacher_feats, "resize one of them first")
    for name, x in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if x.shape[1] == 0:  # as max_pool2d: a pixel without channels has no direction to normalise
            raise ValueError(f"{name}: expected at least one channel, got shape {list(x.shape)}")
    if reduction != "none" and _switches.affinity_sum_path(student_feats.device):
        # the per-image means added and scaled inside the op
        loss = ops._affinity_loss_sum(student_feats, teacher_feats.detach(), pool, reduction == "mean")[0]
        return loss.to(loss_dtype(student_feats))
    # pooling and normalisation happen inside the op, one block of pixels at a time
    per_image = ops.affinity_loss(student_feats, teacher_feats.detach(), pool)[0]  # [B], mean over P*P
    if reduction == "sum":
        P = -(-student_feats.shape[2] // pool) * -(-student_feats.shape[3] // pool)  # ceil-mode pooled pixels
        loss = per_image.sum() * (P ** 2)
    elif reduction == "mean":
        loss = reduce(per_image, "mean")
    else:
        loss = per_image
    return loss.to(loss_dtype(student_feats))


def intra_class_variation_loss(student_feats: Tensor, teacher_feats: Tensor, labels: Tensor, num_classes: int,
                               ignore_index: int = 255, eps: float = 1e-8, reduction: str = "mean",
                               size: Optional[Tuple[int, int]] = None) -> Tensor:
    """Intra-class feature variation distillation (IFVD): per-image class centroids; for each
    pixel the cosine similarity between its feature and its class centroid (pixels without a
    valid label score 1 for both networks); squared difference of the student's and the
    teacher's maps per pixel.

    Args:
        student_feats: ``[B, Cs, H, W]``; teacher_feats: ``[B, Ct, H, W]`` (channels may differ,
            spatial sizes must match); either may be ``[B, N, C]`` tokens with ``size``.
        labels: ``[B, Hy, Wy]`` integer, resized (nearest) to ``H x W``.
        num_classes, ignore_index: as in :func:`idd_ops.class_centroids`. Default ignore_index: 255.
        eps: floor of the cosine denominator. Default: 1e-8.
        reduction: ``"mean"`` (default, over all ``B*H*W`` pixels, CIRKD's convention);
            ``"sum"``; ``"none"``: ``[B, H, W]`` per-pixel values.
        size: ``(H, W)`` of whichever input is ``[B, N, C]`` tokens (``N == H * W``), as in
            :func:`idd_ops.inter_class_distance_loss`. Default: None (no token input).
    """
    student_feats, teacher_feats = v.feature_maps(size, ("student_feats", student_feats),
                                                  ("teacher_feats", teacher_feats))
    v.check_pair(student_feats, teacher_feats)
    v.check_labels(labels, "student_feats", student_feats)
    v.check_num_classes(num_classes, ignore_index)
    v.check_eps(eps)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_same_size(student_feats, teacher_feats, "IFVD compares the two maps pixel by pixel")
    pair = (student_feats, teacher_feats.detach())
    if _ifvd_in_one_op(pair, num_classes):
        ss, st, ns, slots = _pair_sums(pair, labels, num_classes, ignore_index)
        if reduction != "none":  # the maps and their squared difference's mean or sum in one op
            loss = ops._ifvd_loss(*pair, ss, st, ns, slots, float(eps), reduction == "mean")[0]
            return loss.to(loss_dtype(student_feats))
        maps = ops._ifvd_maps(*pair, ss, st, ns, slots, float(eps))[:2]
    else:
        maps = _cosine_maps(pair, labels, num_classes, ignore_index, float(eps))
    # The teacher's map in the student's dtype: torch 2.4's mse_loss backward gave a float64
    # student's map a float32 gradient (an autograd error) when the teacher's map was float32.
    target = maps[1].to(maps[0].dtype)
    if reduction == "mean" and maps[0].numel():  # mse_loss's own mean: two launches fewer than reduce's
        return F.mse_loss(maps[0], target).to(loss_dtype(student_feats))
    # reduce, not mse_loss's own mean, for an empty map: 0, as every other loss gives, not 0/0
    return reduce(F.mse_loss(maps[0], target, reduction="none"), reduction).to(loss_dtype(student_feats))


def _ifvd_in_one_op(pair, num_classes):
    """Whether IFVD's maps (and its loss) come from one op over both networks' class sums
    (_ifvd_maps, _ifvd_loss), whose one kernel instance takes both networks: on the class-sum path
    where _switches.ifvd_maps_path says so, for two networks of one dtype."""
    return uses_class_sums(num_classes, *pair) and _switches.ifvd_maps_path(pair[0].device) \
        and pair[0].dtype == pair[1].dtype


def _pair_sums(pair, labels, num_classes, ignore_index, slots=None):
    """(student sums, teacher sums, counts, slot map) of (student, detached teacher) from one slot
    map. The sums are constants to autograd: the student's cosine op, given its counts, carries the
    gradient through its centroids itself (one pass writes the student's gradient)."""
    if slots is None:
        slots = slots_for(labels, pair[0], num_classes, ignore_index)
    ss, ns, st, _ = pair_sums(*(f.detach() for f in pair), labels, num_classes, ignore_index, slots=slots)
    return ss, st, ns, slots


def _cosine_maps(pair, labels, num_classes, ignore_index, eps):
    """IFVD's maps [B, H, W] of (student, detached teacher) where no one op takes both
    (_ifvd_in_one_op): each pixel's cosine to its class centroid, the student's differentiable."""
    sums = uses_class_sums(num_classes, *pair)
    # one label decode per call: the slot map serves both class passes (on the class-sum path) and
    # both networks' cosine maps, forward and backward
    slots = None
    if sums or (_switches.slot_map_path(pair[0].device) and num_classes <= MAX_SLOT_CLASSES):
        slots = slots_for(labels, pair[0], num_classes, ignore_index)
    if sums:  # one class pass for both
        ss, st, ns, _ = _pair_sums(pair, labels, num_classes, ignore_index, slots)
        # the cosine op computes in the features' accumulation dtype, whatever the sums' dtype
        centroids, counts = detached_centroids((ss, st), ns, [acc_dtype(f.dtype) for f in pair]), (ns, None)
    elif slots is not None:  # the same split: constant centroids, the student's counts to the cosine op
        (cs, ns), (ct, _) = (ops.class_centroids(f.detach(), labels, num_classes, ignore_index) for f in pair)
        centroids, counts = (cs, ct), (ns, None)
    else:
        return [ops.pixel_centroid_cosine(f, ops.class_centroids(f, labels, num_classes, ignore_index)[0], labels,
                                          ignore_index, eps)[0] for f in pair]
    return [ops._pixel_centroid_cosine_slots(f, c, slots, eps, n)[0] for f, c, n in zip(pair, centroids, counts)]


__all__ = ["pixel_kd_loss", "channel_wise_distillation_loss", "structural_kd_loss", "intra_class_variation_loss"]
