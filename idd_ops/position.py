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
import math

import torch

from . import _ops  # noqa: F401  (registers autograd and fake kernels)
from . import _validation as v

KINDS = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes", "sinusoidal")
# element map codes of csrc/common/position.h
_CODE = {"horizontal": 0, "vertical": 1, "gaussian": 2, "horizontal_stripes": 3, "vertical_stripes": 4,
         "sin_x": 5, "cos_x": 6, "sin_y": 7, "cos_y": 8}
# which sizes a code divides by size - 1: (rows, columns)
_NEEDS = {0: (False, True), 1: (True, False), 2: (True, True), 3: (False, False), 4: (False, False),
          5: (False, True), 6: (False, True), 7: (True, False), 8: (True, False)}


def expand_kinds(kinds, num_frequencies=2, num_stripes=4, sigma=0.25):
    """Map kinds -> (codes, params, names) of the elementary maps, one per output channel."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not kinds:
        raise ValueError("kinds: expected at least one map kind")
    if not (isinstance(num_frequencies, int) and num_frequencies >= 1):
        raise ValueError(f"num_frequencies: expected an int >= 1, got {num_frequencies!r}")
    if not (isinstance(num_stripes, int) and num_stripes >= 1):
        raise ValueError(f"num_stripes: expected an int >= 1, got {num_stripes!r}")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    codes, params, names = [], [], []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kinds: unknown map kind {kind!r}; expected any of {', '.join(KINDS)}")
        if kind == "sinusoidal":
            for f in range(num_frequencies):
                for name in ("sin_x", "cos_x", "sin_y", "cos_y"):
                    codes.append(_CODE[name]), params.append(float(2 ** f)), names.append(f"{name}_{2 ** f}")
        else:
            param = {"gaussian": float(sigma), "horizontal_stripes": float(num_stripes),
                     "vertical_stripes": float(num_stripes)}.get(kind, 0.0)
            codes.append(_CODE[kind]), params.append(param), names.append(kind)
    return codes, params, names


def _check_size(codes, names, height, width):
    for code, name in zip(codes, names):
        rows, cols = _NEEDS[code]
        if (rows and height < 2) or (cols and width < 2):
            raise ValueError(f"size: map {name!r} divides by size - 1 and needs height and width >= 2 where it "
                             f"varies; got height={height}, width={width}")


def _factor(code, param, n, axis, dtype, device):
    """1-D factor of an elementary map along rows (axis 0) or columns (axis 1)."""
    i = torch.arange(n, device=device, dtype=torch.float64)
    t = i / (n - 1) if n > 1 else torch.zeros_like(i)
    ones = torch.ones_like(t)
    if code == 2:
        out = torch.exp(-0.5 * ((t - 0.5) / param) ** 2)
    elif code in (0, 5, 6):  # vary along columns only
        out = ones if axis == 0 else {0: t, 5: 0.5 + 0.5 * torch.sin(2 * math.pi * param * t),
                                       6: 0.5 + 0.5 * torch.cos(2 * math.pi * param * t)}[code]
    elif code in (1, 7, 8):
        out = ones if axis == 1 else {1: t, 7: 0.5 + 0.5 * torch.sin(2 * math.pi * param * t),
                                       8: 0.5 + 0.5 * torch.cos(2 * math.pi * param * t)}[code]
    else:  # stripes
        varies = (code == 3 and axis == 0) or (code == 4 and axis == 1)
        out = torch.div(int(param) * torch.arange(n, device=device), n, rounding_mode="floor").remainder(2).double() \
            if varies else ones
    return out.to(dtype)


def position_maps(kinds, height, width, dtype=torch.float32, device=None, num_frequencies=2, num_stripes=4,
                  sigma=0.25):
    """The analytic position maps, materialised: ``[M, height, width]`` (for plotting and for
    the reference path; the fused loss never builds them).

    Args:
        kinds: a map kind or a sequence of them (see the module docstring); "sinusoidal"
            contributes ``4 * num_frequencies`` maps, every other kind one.
        height, width: map size. Kinds that divide by ``size - 1`` need that size >= 2.
        dtype, device: of the result. Defaults: float32, CPU.
        num_frequencies: frequencies of "sinusoidal" (1, 2, 4, ... periods per image). Default: 2.
        num_stripes: bands of the stripe maps. Default: 4.
        sigma: width of "gaussian" as a fraction of the image size. Default: 0.25.
    """
    codes, params, names = expand_kinds(kinds, num_frequencies, num_stripes, sigma)
    _check_size(codes, names, height, width)
    maps = [_factor(c, p, height, 0, torch.float64, device)[:, None] * _factor(c, p, width, 1, torch.float64, device)[None]
            for c, p in zip(codes, params)]
    return torch.stack(maps).to(dtype)


def position_encoding_loss(pred, kinds, reduction="mean", num_frequencies=2, num_stripes=4, sigma=0.25):
    """Mean squared error between predicted position maps and the analytic ones, fused: the
    targets are generated inside the kernel and never stored.

    Args:
        pred: ``[B, M, H, W]`` floating, M = number of maps that ``kinds`` expands to.
        kinds, num_frequencies, num_stripes, sigma: as in :func:`position_maps`.
        reduction: ``"mean"`` (default, over all ``B*M*H*W`` elements), ``"sum"``, or ``"none"``
            (the ``[B, M, H, W]`` squared errors).

    Returns:
        The loss in ``pred.dtype`` (accumulated in float32 for half types).
    """
    v.check_features("pred", pred)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    codes, params, names = expand_kinds(kinds, num_frequencies, num_stripes, sigma)
    if pred.shape[1] != len(codes):
        raise ValueError(f"pred: has {pred.shape[1]} maps but kinds {tuple(names)} give {len(codes)}")
    _check_size(codes, names, pred.shape[2], pred.shape[3])
    from .functional import loss_dtype

    return torch.ops.idd_ops.position_encoding_loss(pred, codes, params, reduction).to(loss_dtype(pred))


def num_maps(kinds, num_frequencies=2):
    """How many maps (output channels) ``kinds`` expands to."""
    return len(expand_kinds(kinds, num_frequencies)[0])
