"""Position information: analytic position maps, the fused position-encoding loss, and a probe
that measures how much position information a network's features carry (Islam et al.,
"How much position information do CNNs encode?", ICLR 2020).

Map kinds (each a [H, W] map with values in [0, 1]; u = x / (W-1), v = y / (H-1)):
    "horizontal"          u
    "vertical"            v
    "gaussian"            exp(-((u - 1/2)^2 + (v - 1/2)^2) / (2 sigma^2)), centred
    "horizontal_stripes"  floor(num_stripes * y / H) mod 2: horizontal bands
    "vertical_stripes"    floor(num_stripes * x / W) mod 2: vertical bands
    "sinusoidal"          4 * num_frequencies maps: (1 + sin(2 pi 2^f u)) / 2, the cosine,
                          and the same in v, for f = 0 .. num_frequencies-1
"""
import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers autograd and fake kernels)
from . import _validation as v
from ._dtypes import loss_dtype
from ._position_maps import ELEMENTS, KINDS, Kinds, check_size, expand_kinds, num_maps, position_maps

# The kernels' code of every elementary map, read from the C++ table (csrc/composite/
# position_map_code.cpp) once: the codes are defined there alone, and a name the C++ side
# does not know fails here, at import.
CODES = {name: int(torch.ops.idd_ops._position_map_code(name)) for name in ELEMENTS}


def position_encoding_loss(pred_maps: Tensor, kinds: Kinds, reduction: str = "mean", num_frequencies: int = 2,
                           num_stripes: int = 4, sigma: float = 0.25) -> Tensor:
    """Mean squared error between predicted position maps and the analytic ones, fused: the
    targets are generated inside the kernel and never stored.

    Args:
        pred_maps: ``[B, M, H, W]`` floating, M = number of maps that ``kinds`` expands to.
        kinds, num_frequencies, num_stripes, sigma: as in :func:`position_maps`.
        reduction: ``"mean"`` (default, over all ``B*M*H*W`` elements), ``"sum"``, or ``"none"``
            (the ``[B, M, H, W]`` squared errors).

    Returns:
        The loss in ``pred_maps.dtype`` (float32 for half inputs under autocast), accumulated in
        float32 for half types.
    """
    v.check_features("pred_maps", pred_maps)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    elements, params, labels = expand_kinds(kinds, num_frequencies, num_stripes, sigma)
    if pred_maps.shape[1] != len(elements):
        raise ValueError(f"pred_maps: has {pred_maps.shape[1]} maps but kinds {tuple(labels)} give {len(elements)}")
    check_size(elements, labels, pred_maps.shape[2], pred_maps.shape[3])
    codes = [CODES[e] for e in elements]
    return torch.ops.idd_ops.position_encoding_loss(pred_maps, codes, params, reduction).to(loss_dtype(pred_maps))


__all__ = ["KINDS", "position_maps", "position_encoding_loss", "num_maps", "expand_kinds"]
