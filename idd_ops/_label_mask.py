"""Which pixels of an H x W map carry a label, for the fused losses that mask pixels (pixel KD).

The kernels that read labels resize them on the fly; here a loss needs only a keep/ignore bit per
pixel, so the comparison with ignore_index is made at the labels' own resolution and the bits
are gathered by the nearest-neighbour index. No resized label tensor is built (the reference
builds one with F.interpolate; the tests hold the two to each other).
"""
import torch


def nearest_index(out_size: int, in_size: int, device: torch.device) -> torch.Tensor:
    """Source index of every output index under F.interpolate(mode="nearest"):
    ``min(floor(i * float32(in / out)), in - 1)``, with the scale and product in float32 as there."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    i = torch.arange(out_size, device=device, dtype=torch.float32)
    return (i * scale.to(device)).floor().long().clamp_max(in_size - 1)


def keep_mask(labels: torch.Tensor, height: int, width: int, ignore_index: int) -> torch.Tensor:
    """``[B, height, width]`` bool: True where the (nearest-resized) label is not ignore_index."""
    keep = labels != ignore_index
    Hy, Wy = keep.shape[1:]
    if (Hy, Wy) != (height, width):
        keep = keep.index_select(1, nearest_index(height, Hy, keep.device))
        keep = keep.index_select(2, nearest_index(width, Wy, keep.device))
    return keep
