"""The class-sum path shared by the public functions: one class-slot map per feature size
(_label_slots), class sums of both networks in one call (class_sums_pair), centroids as sums /
counts, and IDD's K x K tail from the sums (idd_from_sums, the one place a fused tail replaces)."""
from typing import Optional

import torch
from torch import Tensor

from . import _switches
from ._idd_tail import _idd_from_sums
from ._ops import channels_last_layout

ops = torch.ops.idd_ops


# Most classes a slot map holds: slots are int16 (kMaxSlotClasses, csrc/common/label_index.h).
MAX_SLOT_CLASSES = 32767


def uses_class_sums(num_classes: int, *feats: Tensor) -> bool:
    """Whether the class passes over `feats` take the class-sum path (one slot map per feature
    size, class_sums, centroids = sums / counts): where _switches.class_sums_path says so, for
    at most MAX_SLOT_CLASSES classes (more take the centroid op, which copies channels_last
    features to NCHW once). The float64 class sums hold a common offset exactly, so this path is
    the more precise one (the loss 6e-7 off float64 with an offset 10^4 times the class spread,
    against 9e-5 through the centroid op: tests/test_precision.py)."""
    return num_classes <= MAX_SLOT_CLASSES and _switches.class_sums_path(
        feats[0].device, any(channels_last_layout(f) for f in feats))


def slots_for(labels: Tensor, feats: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return ops._label_slots(labels, feats.shape[2], feats.shape[3], num_classes, ignore_index)


def pair_sums(student: Tensor, teacher: Tensor, labels: Tensor, num_classes: int, ignore_index: int,
              slots: Optional[Tensor] = None):
    """Class sums and counts of both feature maps, (ss, ns, st, nt), from one slot map when their
    sizes agree and through one class_sums_pair call (one launch on CUDA where the shapes allow).
    `slots`: the student's slot map when the caller has built it (IFVD reads it again), else
    built here."""
    slots_s = slots_for(labels, student, num_classes, ignore_index) if slots is None else slots
    same = student.shape[2:] == teacher.shape[2:]
    slots_t = slots_s if same else slots_for(labels, teacher, num_classes, ignore_index)
    ss, ns, st, nt = ops.class_sums_pair(student, slots_s, teacher, slots_t, num_classes)
    # One autograd node gives all four outputs: without this, a detached teacher's sums would
    # require grad whenever the student's do, and every op downstream (IFVD's teacher cosine map)
    # would compute a teacher gradient that is then dropped.
    if not teacher.requires_grad:
        st = st.detach()
    if not student.requires_grad:
        ss = ss.detach()
    return ss, ns, st, nt


def centroids_from_sums(sums: Tensor, counts: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Class means [B, K, C] from class sums and counts (0 for an absent class, whose sum is 0),
    divided in the sums' dtype and then cast to `dtype` (default: the sums' dtype)."""
    if sums.dtype == torch.float64 and _switches.class_means_path(sums.device):  # one launch, the same bits
        return ops._class_means(sums, counts, sums.dtype if dtype is None else dtype)
    means = sums / counts.clamp_min(1)[..., None]  # int64 counts promote to the sums' dtype inside the division
    return means if dtype is None else means.to(dtype)


def detached_centroids(sums, counts: Tensor, dtypes):
    """Class means of constant class sums (a tuple, e.g. both networks' over one slot map, whose
    counts are then the same) with their shared `counts`, each divided in its sums' dtype and
    written in its dtype of `dtypes`: one clamp for all, one launch each (the division writes the
    cast; sums / counts and .to() are two)."""
    divisor = counts.clamp_min(1)[..., None]
    return tuple(torch.div(s, divisor, out=torch.empty(s.shape, dtype=d, device=s.device)) for s, d in zip(sums, dtypes))


def idd_from_sums(sums_s: Tensor, counts_s: Tensor, sums_t: Tensor, counts_t: Tensor, metric: str,
                   normalize: Optional[str], eps: float, reduction: str, out_dtype: torch.dtype) -> Tensor:
    """The K x K tail of IDD from both networks' float64 class sums (the teacher's detached),
    computed in float64 (docs/METHOD.md 8): one idd_tail op (composite ATen code on the CPU, a
    fused kernel on CUDA). The loss in `out_dtype`, which the op writes directly where it is
    float32 or float64 (no cast launch)."""
    direct = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    loss = _idd_from_sums(sums_s, counts_s, sums_t.detach(), counts_t, metric, normalize, eps, reduction,
                          torch.float64, direct)
    return loss.to(out_dtype)
