"""The class-sum path shared by the public functions: one class-slot map per feature size
(_label_slots), class sums of both networks in one call (class_sums_pair), centroids as sums /
counts, and IDD's K x K tail from the sums (idd_from_sums, the one place a fused tail replaces)."""
from typing import Optional

import torch
from torch import Tensor

from . import _switches
from ._idd_tail import _idd_from_sums

ops = torch.ops.idd_ops


def uses_class_sums(*feats: Tensor) -> bool:
    """Whether the class passes over `feats` take the class-sum path (one slot map per feature
    size, class_sums, centroids = sums / counts): where _switches.class_sums_path says so.
    Not yet by default for channels_last maps on the CPU, although it reads them in place where
    the centroid op copies them (IDD forward+backward measured 5x faster): float32 sums hold
    count x offset, which with a common offset 10^4 times the class spread puts the normalised
    loss 5e-4 off float64, against 9e-5 through the centroid op (tests/test_precision.py)."""
    return _switches.class_sums_path(feats[0].device)


# Most classes a slot map holds: slots are int16 (kMaxSlotClasses, csrc/common/label_index.h).
MAX_SLOT_CLASSES = 32767


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
    return ops.class_sums_pair(student, slots_s, teacher, slots_t, num_classes)


def centroids_from_sums(sums: Tensor, counts: Tensor) -> Tensor:
    """Class means [B, K, C] from class sums and counts (0 for an absent class, whose sum is 0)."""
    return sums / counts.clamp_min(1)[..., None].to(sums.dtype)


def idd_from_sums(sums_s: Tensor, counts_s: Tensor, sums_t: Tensor, counts_t: Tensor, metric: str,
                   normalize: Optional[str], eps: float, reduction: str) -> Tensor:
    """The K x K tail of IDD from both networks' class sums (the teacher's detached): one
    idd_tail op (composite ATen code on the CPU, a fused kernel on CUDA)."""
    return _idd_from_sums(sums_s, counts_s, sums_t.detach(), counts_t, metric, normalize, eps, reduction)
