"""Dtype policy shared by the fused functions and the reference (torch only)."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a feature dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of a loss computed from x: x's dtype, except float32 for a half or bfloat16 x under
    torch.autocast (as PyTorch's own losses; the kernels accumulate in float32 anyway)."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype
