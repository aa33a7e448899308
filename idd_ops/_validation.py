"""Argument checks of the public functions. They read shapes, dtypes and devices only (never
tensor values), so they cost no host sync and run unchanged under torch.compile."""
import torch

METRICS = ("euclidean", "sqeuclidean", "cosine")
NORMALIZE = (None, "mean")
from ._reduction import REDUCTIONS


def _check_tensor(name, x, dim, layout, floating):
    """x is a `dim`-D tensor (`layout` names its axes) of a floating or an integer dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}; convert with .to_dense()")
    if x.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D {layout} tensor, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer dtype (uint8, int32, int64, ...), got {x.dtype}")


def check_features(name, x):
    _check_tensor(name, x, 4, "[B, C, H, W]", floating=True)


def feature_map(name, x, size):
    """``[B, C, H, W]`` features as they are, or ``[B, N, C]`` tokens of an ``H x W`` map
    (``size=(H, W)``, ``N == H * W``) as a channels_last ``[B, C, H, W]`` view of the same memory:
    a permute of ``x.view(B, H, W, C)``, no copy for a contiguous ``x``. ``size`` is used by
    token inputs only."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        _check_tensor(name, x, 3, "[B, N, C]", floating=True)
        if size is None:
            raise ValueError(f"{name}: [B, N, C] token features need size=(H, W), the map they tile")
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise TypeError(f"size: expected a pair (H, W) of ints, got {size!r}")
        for n in size:
            check_int("size", n, 0)
        H, W = size
        B, N, C = x.shape
        if H * W != N:
            raise ValueError(f"size: {H} x {W} = {H * W} pixels, but {name} has N={N} tokens")
        return x.reshape(B, H, W, C).permute(0, 3, 1, 2)
    _check_tensor(name, x, 4, "[B, C, H, W] (or [B, N, C] tokens with size=(H, W))", floating=True)
    return x


def feature_maps(size, *named):
    """feature_map of each (name, x) pair; a `size` that no token input uses is an error, not
    silently ignored."""
    maps = [feature_map(name, x, size) for name, x in named]
    if size is not None and all(m is x for m, (_, x) in zip(maps, named)):
        raise ValueError(f"size: only [B, N, C] token inputs take a size, but {', '.join(n for n, _ in named)} "
                         f"{'is a' if len(named) == 1 else 'are'} [B, C, H, W] map{'' if len(named) == 1 else 's'}")
    return maps


def check_labels(labels, feats_name, feats):
    _check_tensor("labels", labels, 3, "[B, H, W]", floating=False)
    if labels.shape[0] != feats.shape[0]:
        raise ValueError(f"labels: batch size {labels.shape[0]} differs from {feats_name}'s batch size {feats.shape[0]}")
    if labels.device != feats.device:
        raise ValueError(f"labels: on {labels.device} but {feats_name} on {feats.device}")
    if feats.shape[0] > 0 and min(feats.shape[2:]) > 0 and min(labels.shape[1:]) == 0:
        raise ValueError(f"labels: spatial size {tuple(labels.shape[1:])} is empty but {feats_name}'s is not")


def check_module_features(name, x, channels):
    """[B, C, H, W] features with the channel count a module was built for (before a layer of
    the module reads them, whose own error would not name the argument)."""
    check_features(name, x)
    if x.shape[1] != channels:
        raise ValueError(f"{name}: the module was built for {channels} channels, got shape {tuple(x.shape)}")


def check_pair(student, teacher, names=("student_feats", "teacher_feats")):
    s, t = names
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{t}: batch size {teacher.shape[0]} differs from {s}' {student.shape[0]}")
    if teacher.device != student.device:
        raise ValueError(f"{t}: on {teacher.device} but {s} on {student.device}")


def check_int(name, value, minimum=None):
    """An int (bools are not numbers here): TypeError otherwise; ValueError below minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if not -2 ** 63 <= value < 2 ** 63:  # the ops take int64
        raise ValueError(f"{name}: expected an int in the int64 range [-2**63, 2**63), got {value!r}")


def check_positive(name, value):
    """A finite positive int or float (not a bool): TypeError for another type, ValueError if
    <= 0, inf or NaN (the ops' own checks say the same)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python int or float > 0, got {type(value).__name__} {value!r}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}: expected a finite value > 0, got {value!r}")


# The temperatures whose reciprocal (the logits' scale) and square (the loss's factor) are finite
# in float32, the accumulation dtype of float32, half and bfloat16 inputs: 1 / FLT_MAX and
# sqrt(FLT_MAX).
MIN_TEMPERATURE = 1 / torch.finfo(torch.float32).max
MAX_TEMPERATURE = torch.finfo(torch.float32).max ** 0.5


def check_temperature(temperature, name="temperature"):
    """A temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE] (about 2.9e-39 to 1.8e19): outside it
    1 / T or T^2 is infinite in float32 and the loss NaN for finite logits."""
    check_positive(name, temperature)
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"{name}: expected a value in [{MIN_TEMPERATURE:.3g}, {MAX_TEMPERATURE:.3g}] (1 / T and "
                         f"T^2 must be finite float32 values), got {temperature!r}")


def check_num_classes(num_classes, ignore_index):
    check_int("num_classes", num_classes, 1)
    check_int("ignore_index", ignore_index)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")


def check_eps(eps):
    check_positive("eps", eps)


def check_idd_options(num_classes, ignore_index, metric, normalize, reduction, eps, centroids):
    """The options of inter_class_distance_loss (and of its module, when it is built)."""
    check_num_classes(num_classes, ignore_index)
    check_choice("metric", metric, METRICS)
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("reduction", reduction, REDUCTIONS)
    check_eps(eps)
    check_choice("centroids", centroids, ("image", "batch"))


def check_centroids(centroids, counts):
    _check_tensor("centroids", centroids, 3, "[B, K, C]", floating=True)
    _check_tensor("counts", counts, 2, "[B, K]", floating=False)
    if tuple(counts.shape) != tuple(centroids.shape[:2]):
        raise ValueError(f"counts: expected a [B, K] = {tuple(centroids.shape[:2])} tensor, got "
                         f"{tuple(counts.shape)}")
    if counts.device != centroids.device:
        raise ValueError(f"counts: on {counts.device} but centroids on {centroids.device}")


def check_same_shape(student_name, student, teacher_name, teacher, adapter_hint):
    if student.shape != teacher.shape:
        raise ValueError(f"{teacher_name}: shape {tuple(teacher.shape)} differs from {student_name}' "
                         f"{tuple(student.shape)}; {adapter_hint}")


def check_same_size(student, teacher, why):
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"teacher_feats: spatial size {tuple(teacher.shape[2:])} differs from student_feats' "
                         f"{tuple(student.shape[2:])}; {why}")
