"""Batch-level (and cross-rank) class centroids for ``centroids="batch"``."""
from typing import Optional

import torch
import torch.distributed as dist

from ._class_sums import centroids_from_sums


class _AllReduceSum(torch.autograd.Function):
    """A summing all-reduce with its gradient: the gradient of every rank's input is the sum of
    every rank's output gradient (torch.distributed.nn.functional.all_reduce, which did this,
    is deprecated from torch 2.13 on)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def check_process_group(process_group, centroids):
    """None, or a torch.distributed process group with centroids="batch"."""
    if process_group is None:
        return
    if centroids != "batch":
        raise ValueError("process_group: only used with centroids='batch' (per-image centroids need no communication)")
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group: expected a torch.distributed ProcessGroup (e.g. dist.group.WORLD) or None, "
                        f"got {type(process_group).__name__}")


def pooled_sums(sums: torch.Tensor, counts: torch.Tensor, process_group: Optional[object]):
    """Per-image class sums [B,K,C] and counts [B,K] -> the batch's [1,K,C], [1,K], summed over
    every rank of process_group when one is given (a differentiable all-reduce)."""
    sums = sums.sum(0, keepdim=True)
    counts = counts.sum(0, keepdim=True)
    if process_group is not None:
        sums = _AllReduceSum.apply(sums, process_group)
        counts = counts.clone()
        dist.all_reduce(counts, group=process_group)
    return sums, counts


def pooled_centroids(centroids: torch.Tensor, counts: torch.Tensor, process_group: Optional[object]):
    """Per-image centroids [B,K,C] and counts [B,K] -> one batch-level centroid set [1,K,C], [1,K]
    (pooled as pooled_sums pools). The sums are float64, as the class-sum path's are: ranks whose
    features take different paths (a rank with an empty batch, or another memory layout) then
    all-reduce tensors of one dtype. Float32 here against float64 there aborted the job in gloo."""
    sums = centroids.double() * counts[..., None]
    sums, counts = pooled_sums(sums, counts, process_group)
    return centroids_from_sums(sums, counts, centroids.dtype), counts
