"""Which pixels of an H x W map carry a label, for the fused losses that mask pixels (pixel KD).

Where the class-slot map is on (_switches.slot_map_path: the CPU and CUDA) the mask is one
_label_slots call, the nearest-resize rule of every kernel (csrc/common/label_index.h), which also
rejects a label outside [0, K) that is not ignore_index.
Elsewhere the comparison with ignore_index is made at the labels' own resolution and the bits are
gathered by the nearest-neighbour index (_nearest.py, which the reference resizes with): no
resized label tensor is built.
"""
import torch

from . import _switches
from ._class_sums import MAX_SLOT_CLASSES
from ._nearest import nearest_index


def keep_mask(labels: torch.Tensor, height: int, width: int, ignore_index: int) -> torch.Tensor:
    """``[B, height, width]`` bool: True where the (nearest-resized) label is not ignore_index."""
    info = torch.iinfo(labels.dtype)
    if info.min <= ignore_index <= info.max:
        keep = labels != ignore_index
    else:  # no label of this dtype equals it (comparing would wrap ignore_index into the dtype)
        keep = torch.ones_like(labels, dtype=torch.bool)
    Hy, Wy = keep.shape[1:]
    if (Hy, Wy) != (height, width):
        keep = keep.index_select(1, nearest_index(height, Hy, keep.device))
        keep = keep.index_select(2, nearest_index(width, Wy, keep.device))
    return keep


def kept_pixels(labels: torch.Tensor, height: int, width: int, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``[B, height, width]`` bool: True where the (nearest-resized) label is a class, not
    ignore_index; labels must lie in ``[0, num_classes)`` otherwise (checked where the slot map
    builds the mask)."""
    # no classes: every label must be ignore_index, and the slot op takes at least one class
    if _switches.slot_map_path(labels.device) and 0 < num_classes <= MAX_SLOT_CLASSES:
        return torch.ops.idd_ops._label_slots(labels, height, width, num_classes, ignore_index) >= 0
    return keep_mask(labels, height, width, ignore_index)
