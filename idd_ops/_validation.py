"""Argument checks of the public functions. They read shapes, dtypes and devices only (never
tensor values), so they cost no host sync and run unchanged under torch.compile."""
import torch

METRICS = ("euclidean", "sqeuclidean", "cosine")
NORMALIZE = (None, "mean")
REDUCTIONS = ("mean", "sum", "none")


def check_features(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")


def check_labels(labels, feats_name, feats):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 3:
        raise ValueError(f"labels: expected a 3-D [B, H, W] tensor, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype (uint8, int32, int64, ...), got {labels.dtype}")
    if labels.shape[0] != feats.shape[0]:
        raise ValueError(f"labels: batch size {labels.shape[0]} differs from {feats_name}'s batch size {feats.shape[0]}")
    if labels.device != feats.device:
        raise ValueError(f"labels: on {labels.device} but {feats_name} on {feats.device}")
    if feats.shape[0] > 0 and min(feats.shape[2:]) > 0 and min(labels.shape[1:]) == 0:
        raise ValueError(f"labels: spatial size {tuple(labels.shape[1:])} is empty but {feats_name}'s is not")


def check_pair(student, teacher, names=("student_feats", "teacher_feats")):
    s, t = names
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{t}: batch size {teacher.shape[0]} differs from {s}' {student.shape[0]}")
    if teacher.device != student.device:
        raise ValueError(f"{t}: on {teacher.device} but {s} on {student.device}")


def check_num_classes(num_classes, ignore_index):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")


def check_eps(eps):
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps: expected a positive number, got {eps!r}")


def check_centroids(centroids, counts):
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 3 or not centroids.is_floating_point():
        raise ValueError(f"centroids: expected a floating [B, K, C] tensor, got "
                         f"{tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__}")
    if not isinstance(counts, torch.Tensor) or counts.dim() != 2 or tuple(counts.shape) != tuple(centroids.shape[:2]):
        raise ValueError(f"counts: expected a [B, K] = {tuple(centroids.shape[:2])} tensor, got "
                         f"{tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__}")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"counts: expected an integer dtype, got {counts.dtype}")
    if counts.device != centroids.device:
        raise ValueError(f"counts: on {counts.device} but centroids on {centroids.device}")
