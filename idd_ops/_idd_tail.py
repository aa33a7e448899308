"""IDD's K x K tail from class sums: the one call the fused IDD path makes after its class-sum
pass (op ``idd_ops::idd_tail``; math and saved tensors in csrc/common/idd_tail.h)."""
from typing import Optional, Union

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers autograd and fake kernels)

ops = torch.ops.idd_ops


def _idd_from_sums(sums_s: Tensor, counts_s: Tensor, sums_t: Tensor, counts_t: Tensor, metric: str = "euclidean",
                   normalize: Optional[Union[str, bool]] = None, eps: float = 1e-8, reduction: str = "mean",
                   dtype: Optional[torch.dtype] = None, loss_dtype: Optional[torch.dtype] = None) -> Tensor:
    """IDD loss from per-image class sums and counts (no argument checks: the public functions
    make them).

    Args:
        sums_s: ``[B, K, Cs]`` student class sums (float64 from the class_sums op; any floating
            dtype, half/bfloat16 accumulate in float32). Differentiable: the gradient is
            ``grad_centroid / count`` (0 for an absent class), in the sums' dtype.
        counts_s: ``[B, K]`` int64 student class counts; a class with count 0 is absent.
        sums_t, counts_t: the teacher's, ``[B, K, Ct]`` and ``[B, K]``; a constant (pass
            detached sums: sums that require grad raise).
        metric, normalize, eps, reduction: as in :func:`idd_ops.inter_class_distance_loss`
            (``normalize``: ``None``/``"mean"``, or a bool).
        dtype: float32 or float64, the dtype of the K x K math once the centroids are formed
            and centred in the sums' precision. Default: None (the accumulation dtype of
            ``sums_s``); the library passes float64 (docs/METHOD.md 8).
        loss_dtype: float32 or float64, the loss's. Default: None (``dtype``).

    Returns:
        The loss in ``loss_dtype``: a scalar, or ``[B]`` for ``reduction="none"``.
    """
    mean = normalize is True or normalize == "mean"
    loss, _, _ = ops.idd_tail(sums_s, counts_s, sums_t, counts_t, metric, mean, float(eps), reduction, dtype,
                              loss_dtype)
    return loss
