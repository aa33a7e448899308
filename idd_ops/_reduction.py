"""The reduction rule shared by the losses and their references (torch only)."""
import torch

REDUCTIONS = ("mean", "sum", "none")


def reduce(values: torch.Tensor, reduction: str, count=None, scale: float = 1.0) -> torch.Tensor:
    """"mean": sum / count (default: the number of values; 0 when none are counted), "sum": the
    sum, "none": the values themselves; each times `scale` (a loss's constant factor, T^2 for
    the softmax-KL losses). Where the count is a number it goes into one factor with the scale:
    one multiply where a division and a multiply were two launches on a GPU, forward and
    backward."""
    if reduction == "none":
        return _scaled(values, scale)
    total = values.sum()
    if reduction == "sum":
        return _scaled(total, scale)
    n = values.numel() if count is None else count
    if isinstance(n, torch.Tensor):
        return _scaled(total / n.clamp_min(1), scale)
    return total * (scale / max(n, 1))


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1 else x * scale  # no launch for a factor of 1
