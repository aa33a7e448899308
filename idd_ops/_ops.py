"""Fake (meta) kernels and autograd formulas for the ops declared in csrc/idd_ops.cpp.

Fake kernels let torch.compile trace through the ops without running them; autograd is
wired to the explicit backward ops, so no gradient goes through a chain of PyTorch calls.
"""
import torch
from torch.library import register_fake

from . import _library
from ._autograd import register_autograd
from ._dtypes import acc_dtype

_library.require()  # one clear ImportError, not register_fake's "operator ... does not exist"

ops = torch.ops.idd_ops


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


def _no_zero_fills(ctx):
    """Gradients of the outputs nothing downstream used (counts, saved statistics, a detached
    teacher's sums) stay None in the backward: by default autograd fills a zero tensor for each,
    a launch apiece on a GPU (5 per IDD forward+backward, found by tests/cuda_emu/report.py)."""
    ctx.set_materialize_grads(False)


def _centroids_setup(ctx, inputs, output):
    feats, labels, _, ignore_index = inputs
    _no_zero_fills(ctx)
    ctx.save_for_backward(labels, output[1])
    ctx.size = (feats.shape[2], feats.shape[3])
    ctx.dtype = feats.dtype
    ctx.ignore_index = ignore_index


def _centroids_backward(ctx, grad_centroids, _grad_counts):
    if not ctx.needs_input_grad[0] or grad_centroids is None:
        return None, None, None, None
    labels, counts = ctx.saved_tensors
    grad = ops._class_centroids_backward(grad_centroids, labels, counts, *ctx.size, ctx.dtype, ctx.ignore_index)
    return grad, None, None, None


register_autograd("idd_ops::class_centroids", _centroids_backward, setup_context=_centroids_setup)


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
    memory; their gradient then comes in that layout too."""
    return not feats.is_contiguous() and feats.is_contiguous(memory_format=torch.channels_last)


def _sums_grad(grad_sums, slots, feats_meta):
    dtype, channels_last = feats_meta
    return ops._class_sums_backward(grad_sums, slots, dtype, channels_last)


def _class_sums_setup(ctx, inputs, output):
    feats, slots, _ = inputs
    _no_zero_fills(ctx)
    ctx.save_for_backward(slots)
    ctx.mark_non_differentiable(output[1])
    ctx.meta = (feats.dtype, channels_last_layout(feats))


def _class_sums_backward(ctx, grad_sums, _grad_counts):
    if not ctx.needs_input_grad[0] or grad_sums is None:
        return None, None, None
    (slots,) = ctx.saved_tensors
    return _sums_grad(grad_sums, slots, ctx.meta), None, None


register_autograd("idd_ops::class_sums", _class_sums_backward, setup_context=_class_sums_setup)


def _class_sums_pair_setup(ctx, inputs, output):
    feats_a, slots_a, feats_b, slots_b, _ = inputs
    _no_zero_fills(ctx)
    ctx.save_for_backward(slots_a, slots_b)
    ctx.mark_non_differentiable(output[1], output[3])
    ctx.meta = ((feats_a.dtype, channels_last_layout(feats_a)), (feats_b.dtype, channels_last_layout(feats_b)))


def _class_sums_pair_backward(ctx, grad_a, _grad_na, grad_b, _grad_nb):
    slots_a, slots_b = ctx.saved_tensors
    ga = _sums_grad(grad_a, slots_a, ctx.meta[0]) if ctx.needs_input_grad[0] and grad_a is not None else None
    gb = _sums_grad(grad_b, slots_b, ctx.meta[1]) if ctx.needs_input_grad[2] and grad_b is not None else None
    return ga, None, gb, None, None


register_autograd("idd_ops::class_sums_pair", _class_sums_pair_backward, setup_context=_class_sums_pair_setup)


# ---- class_distance_matrix -------------------------------------------------------------


@register_fake("idd_ops::class_distance_matrix")
def _(centroids, counts, metric, normalize, eps):
    B, K, _ = centroids.shape
    return centroids.new_empty((B, K, K))


@register_fake("idd_ops::_class_distance_matrix_backward")
def _(grad, centroids, counts, metric, normalize, eps):
    return torch.empty_like(centroids, memory_format=torch.contiguous_format)


def _distance_setup(ctx, inputs, output):
    centroids, counts, metric, normalize, eps = inputs
    ctx.save_for_backward(centroids, counts)
    ctx.options = (metric, normalize, eps)


def _distance_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    centroids, counts = ctx.saved_tensors
    return ops._class_distance_matrix_backward(grad, centroids, counts, *ctx.options), None, None, None, None


register_autograd("idd_ops::class_distance_matrix", _distance_backward, setup_context=_distance_setup)


# ---- idd_loss --------------------------------------------------------------------------


@register_fake("idd_ops::idd_loss")
def _(student_dist, teacher_dist, student_counts, teacher_counts, reduction):
    shape = (student_dist.shape[0],) if reduction == "none" else ()
    return student_dist.new_empty(shape)


@register_fake("idd_ops::_idd_loss_backward")
def _(grad, student_dist, teacher_dist, student_counts, teacher_counts, reduction):
    return torch.empty_like(student_dist, memory_format=torch.contiguous_format)


def _idd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.reduction = inputs[4]


def _idd_backward(ctx, grad):
    ds, dt, cs, ct = ctx.saved_tensors
    grad_s = ops._idd_loss_backward(grad, ds, dt, cs, ct, ctx.reduction)
    # The loss depends on Ds - Dt only, so the teacher's gradient is the negation.
    grad_t = -grad_s.to(dt.dtype) if ctx.needs_input_grad[1] else None
    return grad_s if ctx.needs_input_grad[0] else None, grad_t, None, None, None


register_autograd("idd_ops::idd_loss", _idd_backward, setup_context=_idd_setup)


# ---- position_encoding_loss ------------------------------------------------------------


@register_fake("idd_ops::position_encoding_loss")
def _(pred, kinds, params, reduction):
    if reduction == "none":
        return torch.empty_like(pred, memory_format=torch.contiguous_format)
    return pred.new_empty((), dtype=acc_dtype(pred.dtype))


@register_fake("idd_ops::_position_encoding_loss_backward")
def _(grad, pred, kinds, params, reduction):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _position_setup(ctx, inputs, output):
    pred, kinds, params, reduction = inputs
    ctx.save_for_backward(pred)
    ctx.options = (kinds, params, reduction)


def _position_backward(ctx, grad):
    (pred,) = ctx.saved_tensors
    return ops._position_encoding_loss_backward(grad, pred, *ctx.options), None, None, None


register_autograd("idd_ops::position_encoding_loss", _position_backward, setup_context=_position_setup)


# ---- softmax_kl ------------------------------------------------------------------------


@register_fake("idd_ops::softmax_kl")
def _(student, teacher, temperature):
    shape, dtype = (student.shape[0], student.shape[2]), acc_dtype(student.dtype)
    return tuple(student.new_empty(shape, dtype=dtype) for _ in range(3))


@register_fake("idd_ops::_softmax_kl_backward")
def _(grad, student, teacher, lse_student, lse_teacher, temperature):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _teacher_is_constant(teacher, op):
    # Checked when the op is called (setup runs in the forward), not when backward reaches it.
    if teacher.requires_grad:
        raise RuntimeError(f"idd_ops::{op}: the teacher input requires grad, but it is a constant that gets no "
                           "gradient; pass teacher.detach()")


def _kl_setup(ctx, inputs, output):
    student, teacher, temperature = inputs
    _teacher_is_constant(teacher, "softmax_kl")
    _no_zero_fills(ctx)
    ctx.save_for_backward(student, teacher, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.temperature = temperature


def _kl_backward(ctx, grad, _grad_lse_s, _grad_lse_t):
    if grad is None:
        return None, None, None
    student, teacher, lse_s, lse_t = ctx.saved_tensors
    return ops._softmax_kl_backward(grad, student, teacher, lse_s, lse_t, ctx.temperature), None, None


register_autograd("idd_ops::softmax_kl", _kl_backward, setup_context=_kl_setup)


# ---- affinity_loss ---------------------------------------------------------------------


@register_fake("idd_ops::affinity_loss")
def _(student, teacher, pool):
    B, Cs = student.shape[:2]
    acc = acc_dtype(student.dtype)
    return (student.new_empty((B,), dtype=acc), student.new_empty((B, Cs, Cs), dtype=acc),
            student.new_empty((B, Cs, teacher.shape[1]), dtype=acc))


@register_fake("idd_ops::_affinity_loss_backward")
def _(grad, student, teacher, gram_ss, gram_st, pool):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _affinity_setup(ctx, inputs, output):
    _teacher_is_constant(inputs[1], "affinity_loss")
    _no_zero_fills(ctx)
    ctx.save_for_backward(inputs[0], inputs[1], output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.pool = inputs[2]


def _affinity_backward(ctx, grad, _g_ss, _g_st):
    if grad is None:
        return None, None, None
    fs, ft, gss, gst = ctx.saved_tensors
    return ops._affinity_loss_backward(grad, fs, ft, gss, gst, ctx.pool), None, None


register_autograd("idd_ops::affinity_loss", _affinity_backward, setup_context=_affinity_setup)


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


def _cosine_setup(ctx, inputs, output):
    feats, centroids, labels, ignore_index, eps = inputs
    _no_zero_fills(ctx)
    ctx.save_for_backward(feats, centroids, labels, output[0], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.options = (ignore_index, eps)


def _cosine_backward(ctx, grad, _grad_norms):
    if grad is None:
        return (None,) * 5
    feats, centroids, labels, cos, norms = ctx.saved_tensors
    grad_f, grad_c = ops._pixel_centroid_cosine_backward(grad, feats, centroids, labels, cos, norms, *ctx.options)
    return (grad_f if ctx.needs_input_grad[0] else None, grad_c if ctx.needs_input_grad[1] else None,
            None, None, None)


register_autograd("idd_ops::pixel_centroid_cosine", _cosine_backward, setup_context=_cosine_setup)


def _cosine_slots_setup(ctx, inputs, output):
    feats, centroids, slots, eps, counts = inputs
    if counts is not None and centroids.requires_grad:
        raise ValueError("centroids: with counts they are feats' own class means, whose gradient reaches feats "
                         "inside the op; pass them detached")
    _no_zero_fills(ctx)
    ctx.save_for_backward(feats, centroids, slots, output[0], output[1], counts)
    ctx.mark_non_differentiable(output[1])
    ctx.eps = eps


def _cosine_slots_backward(ctx, grad, _grad_norms):
    if grad is None:
        return (None,) * 5
    feats, centroids, slots, cos, norms, counts = ctx.saved_tensors
    grad_f, grad_c = ops._pixel_centroid_cosine_slots_backward(grad, feats, centroids, slots, cos, norms, ctx.eps,
                                                               counts)
    return grad_f if ctx.needs_input_grad[0] else None, grad_c if ctx.needs_input_grad[1] else None, None, None, None


register_autograd("idd_ops::_pixel_centroid_cosine_slots", _cosine_slots_backward, setup_context=_cosine_slots_setup)


# ---- idd_tail --------------------------------------------------------------------------


@register_fake("idd_ops::idd_tail")
def _(student_sums, student_counts, teacher_sums, teacher_counts, metric, normalize, eps, reduction, dtype=None):
    B, K, _ = student_sums.shape
    acc = acc_dtype(student_sums.dtype) if dtype is None else dtype
    loss = student_sums.new_empty((B,) if reduction == "none" else (), dtype=acc)
    # layout of the saved tensors: csrc/common/idd_tail.h
    return loss, student_sums.new_empty((B, 2, K, K), dtype=acc), student_sums.new_empty((B, K + 1, 8),
                                                                                         dtype=torch.float64)


@register_fake("idd_ops::_idd_tail_backward")
def _(grad, student_sums, student_counts, teacher_counts, dist, stats, metric, normalize, eps, reduction):
    return torch.empty_like(student_sums, memory_format=torch.contiguous_format)


def _tail_setup(ctx, inputs, output):
    student_sums, student_counts, teacher_sums, teacher_counts, metric, normalize, eps, reduction = inputs[:8]
    _teacher_is_constant(teacher_sums, "idd_tail")
    _no_zero_fills(ctx)
    ctx.save_for_backward(student_sums, student_counts, teacher_counts, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.options = (metric, normalize, eps, reduction)


def _tail_backward(ctx, grad, _grad_dist, _grad_stats):
    if not ctx.needs_input_grad[0] or grad is None:
        return (None,) * 9
    sums, counts_s, counts_t, dist, stats = ctx.saved_tensors
    grad_sums = ops._idd_tail_backward(grad, sums, counts_s, counts_t, dist, stats, *ctx.options)
    return (grad_sums,) + (None,) * 8


register_autograd("idd_ops::idd_tail", _tail_backward, setup_context=_tail_setup)
