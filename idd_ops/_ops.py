"""Fake (meta) kernels of the ops declared in csrc/idd_ops.cpp: they let torch.compile trace
through the ops without running them. Autograd is registered in C++ (csrc/autograd/), wired to
the explicit backward ops, so no gradient goes through a chain of PyTorch calls.
"""
import torch
from torch.library import register_fake

from . import _library
from ._dtypes import acc_dtype

_library.require()  # one clear ImportError, not register_fake's "operator ... does not exist"


# ---- class_centroids -------------------------------------------------------------------


@register_fake("idd_ops::class_centroids")
def _(feats, labels, num_classes, ignore_index):
    B, C = feats.shape[0], feats.shape[1]
    centroids = feats.new_empty((B, num_classes, C), dtype=acc_dtype(feats.dtype))
    return centroids, feats.new_empty((B, num_classes), dtype=torch.int64)


@register_fake("idd_ops::_class_centroids_ordered")
def _(feats, labels, num_classes, ignore_index):
    B, C = feats.shape[0], feats.shape[1]
    centroids = feats.new_empty((B, num_classes, C), dtype=acc_dtype(feats.dtype))
    return centroids, feats.new_empty((B, num_classes), dtype=torch.int64)


@register_fake("idd_ops::_class_centroids_backward")
def _(grad_centroids, labels, counts, height, width, dtype, ignore_index):
    B, _, C = grad_centroids.shape
    return grad_centroids.new_empty((B, C, height, width), dtype=dtype)


# ---- _label_slots, class_sums ---------------------------------------------------------


@register_fake("idd_ops::_label_slots")
def _(labels, height, width, num_classes, ignore_index):
    return labels.new_empty((labels.shape[0], height, width), dtype=torch.int16)


def _sums_fake(feats, num_classes):
    B, C = feats.shape[0], feats.shape[1]
    return (feats.new_empty((B, num_classes, C), dtype=torch.float64),
            feats.new_empty((B, num_classes), dtype=torch.int64))


@register_fake("idd_ops::class_sums")
def _(feats, slots, num_classes):
    return _sums_fake(feats, num_classes)


@register_fake("idd_ops::class_sums_pair")
def _(feats_a, slots_a, feats_b, slots_b, num_classes):
    return _sums_fake(feats_a, num_classes) + _sums_fake(feats_b, num_classes)


@register_fake("idd_ops::_class_sums_backward")
def _(grad_sums, slots, dtype, channels_last):
    B, _, C = grad_sums.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((B, C, slots.shape[1], slots.shape[2]), dtype=dtype, device=grad_sums.device, memory_format=fmt)


def channels_last_layout(feats):
    """Whether the class-sum kernels read `feats` [B, C, H, W] as channels_last (pixel-major)
    memory; their gradient then comes in that layout too (csrc/common/checks.h has the same
    test in C++)."""
    return not feats.is_contiguous() and feats.is_contiguous(memory_format=torch.channels_last)


@register_fake("idd_ops::_class_means")
def _(sums, counts, dtype):
    return torch.empty(sums.shape, dtype=dtype, device=sums.device)


@register_fake("idd_ops::_class_means_backward")
def _(grad, counts):
    return torch.empty(grad.shape, dtype=torch.float64, device=grad.device)


# ---- class_distance_matrix -------------------------------------------------------------


@register_fake("idd_ops::class_distance_matrix")
def _(centroids, counts, metric, normalize, eps):
    B, K, _ = centroids.shape
    return centroids.new_empty((B, K, K))


@register_fake("idd_ops::_class_distance_matrix_backward")
def _(grad, centroids, counts, metric, normalize, eps):
    return torch.empty_like(centroids, memory_format=torch.contiguous_format)


# ---- idd_loss --------------------------------------------------------------------------


@register_fake("idd_ops::idd_loss")
def _(student_dist, teacher_dist, student_counts, teacher_counts, reduction):
    shape = (student_dist.shape[0],) if reduction == "none" else ()
    return student_dist.new_empty(shape)


@register_fake("idd_ops::_idd_loss_backward")
def _(grad, student_dist, teacher_dist, student_counts, teacher_counts, reduction):
    return torch.empty_like(student_dist, memory_format=torch.contiguous_format)


# ---- position_encoding_loss ------------------------------------------------------------


@register_fake("idd_ops::position_encoding_loss")
def _(pred, kinds, params, reduction):
    if reduction == "none":
        return torch.empty_like(pred, memory_format=torch.contiguous_format)
    return pred.new_empty((), dtype=acc_dtype(pred.dtype))


@register_fake("idd_ops::_position_encoding_loss_backward")
def _(grad, pred, kinds, params, reduction):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


# ---- softmax_kl ------------------------------------------------------------------------


@register_fake("idd_ops::softmax_kl")
def _(student, teacher, temperature):
    shape = (student.shape[0], student.shape[2])  # kl in the accumulation dtype, both lse in float64
    return tuple(student.new_empty(shape, dtype=dtype) for dtype in (acc_dtype(student.dtype), torch.float64, torch.float64))


@register_fake("idd_ops::_softmax_kl_backward")
def _(grad, student, teacher, lse_student, lse_teacher, temperature):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@register_fake("idd_ops::_pixel_kd_sum")
def _(student, teacher, slots, temperature, mean):
    shape = (student.shape[0], student.shape[2])  # the loss in the accumulation dtype, the rest in float64
    return (student.new_empty((), dtype=acc_dtype(student.dtype)), student.new_empty(shape, dtype=torch.float64),
            student.new_empty(shape, dtype=torch.float64), student.new_empty((), dtype=torch.float64))


@register_fake("idd_ops::_pixel_kd_sum_backward")
def _(grad, student, teacher, slots, lse_student, lse_teacher, factor, temperature):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


# ---- affinity_loss ---------------------------------------------------------------------


@register_fake("idd_ops::affinity_loss")
def _(student, teacher, pool):
    B, Cs = student.shape[:2]
    acc = acc_dtype(student.dtype)
    return (student.new_empty((B,), dtype=acc), student.new_empty((B, Cs, Cs), dtype=acc),
            student.new_empty((B, Cs, teacher.shape[1]), dtype=acc))


@register_fake("idd_ops::_affinity_loss_backward")
def _(grad, student, teacher, gram_ss, gram_sd, pool):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@register_fake("idd_ops::_affinity_loss_sum")
def _(student, teacher, pool, mean):
    B, Cs = student.shape[:2]
    acc = acc_dtype(student.dtype)
    return (student.new_empty((), dtype=acc), student.new_empty((B, Cs, Cs), dtype=acc),
            student.new_empty((B, Cs, teacher.shape[1]), dtype=acc))


@register_fake("idd_ops::_affinity_loss_sum_backward")
def _(grad, student, teacher, gram_ss, gram_sd, pool, mean):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


# ---- pixel_centroid_cosine -------------------------------------------------------------


def _cosine_fake(feats):
    B, _, H, W = feats.shape
    acc = acc_dtype(feats.dtype)
    return feats.new_empty((B, H, W), dtype=acc), feats.new_empty((B, H, W), dtype=acc)


def _cosine_grads_fake(feats, centroids):
    return (torch.empty_like(feats, memory_format=torch.contiguous_format),
            torch.empty_like(centroids, memory_format=torch.contiguous_format))


@register_fake("idd_ops::pixel_centroid_cosine")
def _(feats, centroids, labels, ignore_index, eps):
    return _cosine_fake(feats)


@register_fake("idd_ops::_pixel_centroid_cosine_backward")
def _(grad, feats, centroids, labels, cos, feat_norms, ignore_index, eps):
    return _cosine_grads_fake(feats, centroids)


@register_fake("idd_ops::_pixel_centroid_cosine_slots")
def _(feats, centroids, slots, eps, counts=None):
    return _cosine_fake(feats)


@register_fake("idd_ops::_pixel_centroid_cosine_slots_backward")
def _(grad, feats, centroids, slots, cos, feat_norms, eps, counts=None):
    return _cosine_grads_fake(feats, centroids)


def _ifvd_maps_fake(student, teacher, counts):
    cos_s, fnorm_s = _cosine_fake(student)
    B, K = counts.shape
    return cos_s, _cosine_fake(teacher)[0], fnorm_s, student.new_empty((B, K, student.shape[1]),
                                                                         dtype=acc_dtype(student.dtype))


@register_fake("idd_ops::_ifvd_maps")
def _(student, teacher, student_sums, teacher_sums, counts, slots, eps):
    return _ifvd_maps_fake(student, teacher, counts)


@register_fake("idd_ops::_ifvd_loss")
def _(student, teacher, student_sums, teacher_sums, counts, slots, eps, mean):
    acc = acc_dtype(student.dtype)
    B, K = counts.shape
    return (student.new_empty((), dtype=acc),) + _ifvd_maps_fake(student, teacher, counts)[:3] + (
        student.new_empty((B, student.shape[1], K), dtype=acc), student.new_empty((B, K), dtype=acc))


@register_fake("idd_ops::_ifvd_loss_backward")
def _(grad, student, student_table, student_norms, slots, cos_student, cos_teacher, feat_norms, counts, eps, mean):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


# ---- idd_tail --------------------------------------------------------------------------


@register_fake("idd_ops::idd_tail")
def _(student_sums, student_counts, teacher_sums, teacher_counts, metric, normalize, eps, reduction, dtype=None,
      loss_dtype=None):
    B, K, _ = student_sums.shape
    acc = acc_dtype(student_sums.dtype) if dtype is None else dtype
    loss = student_sums.new_empty((B,) if reduction == "none" else (), dtype=acc if loss_dtype is None else loss_dtype)
    # layout of the saved tensors: csrc/common/idd_tail.h
    return loss, student_sums.new_empty((B, 2, K, K), dtype=acc), student_sums.new_empty((B, K + 1, 8),
                                                                                         dtype=torch.float64)


@register_fake("idd_ops::_idd_tail_backward")
def _(grad, student_sums, student_counts, teacher_counts, dist, stats, metric, normalize, eps, reduction):
    return torch.empty_like(student_sums, memory_format=torch.contiguous_format)


