"""The reduction rule shared by the losses and their references (torch only)."""
import torch

REDUCTIONS = ("mean", "sum", "none")


def reduce(values: torch.Tensor, reduction: str, count=None) -> torch.Tensor:
    """"mean": sum / count (default: the number of values; 0 when none are counted), "sum": the
    sum, "none": the values themselves."""
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    n = values.numel() if count is None else count
    return total / (n.clamp_min(1) if isinstance(n, torch.Tensor) else max(n, 1))
