"""Baseline segmentation-KD losses, fused, with the conventions of the CIRKD code base so that
published numbers stay comparable (METHOD.md section 7):

- pixel_kd_loss: per-pixel KL over classes at temperature T, times T^2, / (B*H*W)
- channel_wise_distillation_loss (CWD): per-channel softmax over pixels at T, KL, / (B*C) * T^2
- structural_kd_loss (SKD): pairwise-affinity MSE through C x C Gram products
- intra_class_variation_loss (IFVD): MSE between student and teacher maps of each pixel's cosine
  similarity to its class centroid

Teachers are constants: no gradient reaches them. Losses come in the student's dtype (float32
under autocast).
"""
import torch
import torch.nn.functional as F

from . import _ops  # noqa: F401  (registers autograd and fake kernels)
from . import _validation as v
from .functional import loss_dtype
from .reference import resize_labels

ops = torch.ops.idd_ops


def _same_shape(student_name, student, teacher_name, teacher, adapter_hint):
    if student.shape != teacher.shape:
        raise ValueError(f"{teacher_name}: shape {tuple(teacher.shape)} differs from {student_name}' "
                         f"{tuple(student.shape)}; {adapter_hint}")


def _check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")


def pixel_kd_loss(student_logits, teacher_logits, temperature=1.0, ignore_index=None, labels=None):
    """Pixel-wise KD: ``sum_c p_t (log p_t - log p_s)`` at temperature T, times ``T^2``.

    Args:
        student_logits, teacher_logits: ``[B, K, H, W]`` floating, same shape.
        temperature: T > 0. Default: 1.0.
        ignore_index, labels: when both are given (labels ``[B, Hy, Wy]``, resized by nearest
            neighbour to ``H x W`` if needed), pixels labelled ``ignore_index`` are left out and
            the sum is divided by the number of remaining pixels; otherwise by ``B*H*W``.

    Returns:
        A scalar in the logits' dtype.
    """
    v.check_features("student_logits", student_logits)
    v.check_features("teacher_logits", teacher_logits)
    v.check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    _same_shape("student_logits", student_logits, "teacher_logits", teacher_logits,
                "pixel KD compares class distributions pixel by pixel: resize the teacher's logits to the "
                "student's size first (both must have K classes)")
    _check_temperature(temperature)
    B, K, H, W = student_logits.shape
    kl = ops.softmax_kl(student_logits.reshape(B, K, H * W), teacher_logits.detach().reshape(B, K, H * W),
                        float(temperature))[0]
    if labels is not None and ignore_index is not None:
        v.check_labels(labels, "student_logits", student_logits)
        keep = (resize_labels(labels, (H, W)) != ignore_index).reshape(B, H * W)
        loss = torch.where(keep, kl, torch.zeros_like(kl)).sum() / keep.sum().clamp_min(1)
    else:
        loss = kl.mean() if kl.numel() else kl.sum()
    return (loss * temperature ** 2).to(loss_dtype(student_logits))


def channel_wise_distillation_loss(student_feats, teacher_feats, temperature=4.0):
    """Channel-wise distillation (CWD): for each (image, channel), softmax over the H*W pixels at
    temperature T; KL(teacher || student) summed over pixels, averaged over B*C, times ``T^2``.

    Args:
        student_feats, teacher_feats: ``[B, C, H, W]``, same shape. Where channel counts differ,
            use :class:`idd_ops.nn.ChannelWiseDistillationLoss`, which adds a 1x1 adapter.
        temperature: T > 0. Default: 4.0.
    """
    v.check_features("student_feats", student_feats)
    v.check_features("teacher_feats", teacher_feats)
    v.check_pair(student_feats, teacher_feats)
    _same_shape("student_feats", student_feats, "teacher_feats", teacher_feats,
                "CWD compares channel by channel: adapt the student's channels with a 1x1 conv "
                "(idd_ops.nn.ChannelWiseDistillationLoss(student_channels, teacher_channels) has one) "
                "and match the spatial size")
    _check_temperature(temperature)
    B, C, H, W = student_feats.shape
    kl = ops.softmax_kl(student_feats.reshape(B * C, H * W, 1), teacher_feats.detach().reshape(B * C, H * W, 1),
                        float(temperature))[0]
    loss = kl.sum() / max(B * C, 1)
    return (loss * temperature ** 2).to(loss_dtype(student_feats))


def _affinity_features(x, pool):
    if pool > 1:
        x = F.max_pool2d(x, kernel_size=pool, stride=pool, ceil_mode=True)
    return F.normalize(x.flatten(2), dim=1)


def structural_kd_loss(student_feats, teacher_feats, pool=2):
    """Structural KD (pairwise affinity): ``pool x pool`` max pooling (ceil mode), L2
    normalisation over channels, affinity ``A = F^T F`` over the P pooled pixels, loss = mean
    over ``B*P*P`` of ``(A_S - A_T)^2``. Computed through C x C Gram products, so the extra
    memory is O(B*C*C), never O(B*P*P).

    Args:
        student_feats: ``[B, Cs, H, W]``; teacher_feats: ``[B, Ct, H, W]`` (channels may differ,
            spatial sizes must match).
        pool: pooling window and stride; 1 for none. Default: 2.
    """
    v.check_features("student_feats", student_feats)
    v.check_features("teacher_feats", teacher_feats)
    v.check_pair(student_feats, teacher_feats)
    if not (isinstance(pool, int) and pool >= 1):
        raise ValueError(f"pool: expected an int >= 1, got {pool!r}")
    if student_feats.shape[2:] != teacher_feats.shape[2:]:
        raise ValueError(f"teacher_feats: spatial size {tuple(teacher_feats.shape[2:])} differs from student_feats' "
                         f"{tuple(student_feats.shape[2:])}; resize one of them first")
    fs = _affinity_features(student_feats, pool)
    ft = _affinity_features(teacher_feats.detach(), pool)
    return ops.affinity_loss(fs, ft)[0].to(loss_dtype(student_feats))


def intra_class_variation_loss(student_feats, teacher_feats, labels, num_classes, ignore_index=255, eps=1e-8):
    """Intra-class feature variation distillation (IFVD): per-image class centroids; for each
    pixel the cosine similarity between its feature and its class centroid (pixels without a
    valid label score 1 for both networks); MSE between the student's and the teacher's maps,
    averaged over all ``B*H*W`` pixels.

    Args:
        student_feats: ``[B, Cs, H, W]``; teacher_feats: ``[B, Ct, H, W]`` (channels may differ,
            spatial sizes must match).
        labels: ``[B, Hy, Wy]`` integer, resized (nearest) to ``H x W``.
        num_classes, ignore_index: as in :func:`idd_ops.class_centroids`.
        eps: floor of the cosine denominator. Default: 1e-8.
    """
    v.check_features("student_feats", student_feats)
    v.check_features("teacher_feats", teacher_feats)
    v.check_pair(student_feats, teacher_feats)
    v.check_labels(labels, "student_feats", student_feats)
    v.check_num_classes(num_classes, ignore_index)
    v.check_eps(eps)
    if student_feats.shape[2:] != teacher_feats.shape[2:]:
        raise ValueError(f"teacher_feats: spatial size {tuple(teacher_feats.shape[2:])} differs from student_feats' "
                         f"{tuple(student_feats.shape[2:])}; IFVD compares the two maps pixel by pixel")
    maps = []
    for feats in (student_feats, teacher_feats.detach()):
        centroids, _ = ops.class_centroids(feats, labels, num_classes, ignore_index)
        maps.append(ops.pixel_centroid_cosine(feats, centroids, labels, ignore_index, float(eps))[0])
    return F.mse_loss(maps[0], maps[1]).to(loss_dtype(student_feats))


__all__ = ["pixel_kd_loss", "channel_wise_distillation_loss", "structural_kd_loss", "intra_class_variation_loss"]
