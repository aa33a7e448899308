"""The nearest-neighbour label resize of METHOD.md 1 in torch alone: the reference's resize and
the fused losses' label masks (where no slot map is built) both index with it; the kernels compute
the same index on the fly (csrc/common/label_index.h)."""
import torch


def nearest_index(out_size: int, in_size: int, device: torch.device) -> torch.Tensor:
    """Source index of every output index under ``F.interpolate(x.float(), mode="nearest")``:
    ``min(floor(i * float32(in / out)), in - 1)``, with the scale and the product in float32 as
    there. (A float64 x takes a float64 scale there, and other rows at some ratios: 20 -> 216 rows
    picks row 14 for row 162 in float32, 15 in float64.)"""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    i = torch.arange(out_size, device=device, dtype=torch.float32)
    # scale stays a CPU scalar (no host-to-device copy, which would also break graph capture)
    return (i * scale).floor().long().clamp_max(in_size - 1)


def resize_nearest(labels: torch.Tensor, size) -> torch.Tensor:
    """``[B, Hy, Wy]`` -> ``[B, H, W]`` by nearest_index along both axes, the values as they are
    (a float32 round trip would change labels past 2^24)."""
    H, W = size
    rows = nearest_index(H, labels.shape[-2], labels.device)
    cols = nearest_index(W, labels.shape[-1], labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)
