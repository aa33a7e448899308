"""Analytic position maps in plain PyTorch (no compiled library): the kinds a user names, the
elementary maps they expand to, and the maps themselves. The fused loss (position.py) turns
the elementary names into the C++ kernels' codes; the reference materialises the maps here.

The kinds and their formulas are listed in idd_ops.position.
"""
import math
from collections.abc import Sequence as SequenceABC
from typing import List, Optional, Sequence, Tuple, Union

import torch

Kinds = Union[str, Sequence[str]]

KINDS = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes", "sinusoidal")
# Elementary maps (one output channel each) and, for each, whether it divides by size - 1
# along (rows, columns): those need that size >= 2.
ELEMENTS = {"horizontal": (False, True), "vertical": (True, False), "gaussian": (True, True),
            "horizontal_stripes": (False, False), "vertical_stripes": (False, False),
            "sin_x": (False, True), "cos_x": (False, True), "sin_y": (True, False), "cos_y": (True, False)}


def _check_int(name, value, minimum, maximum):
    expected = f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


# Stripe counts the kernels' int64 band index (count * row) holds for any map size, and
# frequencies 2^0 .. 2^62 (more bands than a map has pixels make either map noise).
MAX_STRIPES = 2 ** 31 - 1
MAX_FREQUENCIES = 63
# The smallest sigma a float32 map holds as a normal number (one that rounds to 0 gave 0 / 0 at
# the centre of an odd-sized map).
MIN_SIGMA = torch.finfo(torch.float32).tiny


def kind_tuple(kinds: Kinds) -> Tuple[str, ...]:
    """One kind or an ordered sequence of kinds as a tuple. A set (or another unordered
    collection) is a TypeError: the maps' order is the output channels' order, and a set's
    iteration order changes between processes (string hashing), so a read-out saved in one
    would be compared with other maps in the next."""
    if isinstance(kinds, str):
        return (kinds,)
    if not isinstance(kinds, SequenceABC):
        raise TypeError(f"kinds: expected a map kind or a list or tuple of them (ordered: one output map each, in "
                        f"that order), got {type(kinds).__name__} {kinds!r}")
    return tuple(kinds)


def expand_kinds(kinds: Kinds, num_frequencies: int = 2, num_stripes: int = 4,
                 sigma: float = 0.25) -> Tuple[List[str], List[float], List[str]]:
    """Map kinds -> (elementary map names, their parameters, display labels), one per output channel."""
    kinds = kind_tuple(kinds)
    if not kinds:
        raise ValueError("kinds: expected at least one map kind")
    _check_int("num_frequencies", num_frequencies, 1, MAX_FREQUENCIES)
    _check_int("num_stripes", num_stripes, 1, MAX_STRIPES)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma: expected a finite positive number, got {sigma!r}")
    if not 0 < sigma < float("inf"):
        raise ValueError(f"sigma: expected a finite positive number, got {sigma!r}")
    if not MIN_SIGMA <= sigma <= torch.finfo(torch.float32).max:  # float32 maps take it as a float
        raise ValueError(f"sigma: expected a normal float32 in [{MIN_SIGMA:.3g}, 3.4e38], got {sigma!r}")
    elements, params, labels = [], [], []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kinds: unknown map kind {kind!r}; expected any of {', '.join(KINDS)}")
        if kind == "sinusoidal":
            for f in range(num_frequencies):
                for name in ("sin_x", "cos_x", "sin_y", "cos_y"):
                    elements.append(name), params.append(float(2 ** f)), labels.append(f"{name}_{2 ** f}")
        else:
            param = {"gaussian": float(sigma), "horizontal_stripes": float(num_stripes),
                     "vertical_stripes": float(num_stripes)}.get(kind, 0.0)
            elements.append(kind), params.append(param), labels.append(kind)
    return elements, params, labels


def check_size(elements: Sequence[str], labels: Sequence[str], height: int, width: int) -> None:
    for element, label in zip(elements, labels):
        rows, cols = ELEMENTS[element]
        if (rows and height < 2) or (cols and width < 2):
            raise ValueError(f"size: map {label!r} divides by size - 1 and needs height and width >= 2 where it "
                             f"varies; got height={height}, width={width}")


def _factor(element, param, n, axis, device):
    """1-D float64 factor of an elementary map along rows (axis 0) or columns (axis 1)."""
    i = torch.arange(n, device=device, dtype=torch.float64)
    t = i / (n - 1) if n > 1 else torch.zeros_like(i)
    along = 1 if element.endswith("_x") or element in ("horizontal", "vertical_stripes") else 0
    if element == "gaussian":
        return torch.exp(-0.5 * ((t - 0.5) / param) ** 2)
    if axis != along:
        return torch.ones_like(t)
    if element in ("horizontal", "vertical"):
        return t
    if element.startswith("sin"):
        return 0.5 + 0.5 * torch.sin(2 * math.pi * param * t)
    if element.startswith("cos"):
        return 0.5 + 0.5 * torch.cos(2 * math.pi * param * t)
    # stripes
    return torch.div(int(param) * torch.arange(n, device=device), n, rounding_mode="floor").remainder(2).double()


def position_maps(kinds: Kinds, height: int, width: int, dtype: torch.dtype = torch.float32,
                  device: Optional[Union[str, torch.device]] = None, num_frequencies: int = 2, num_stripes: int = 4,
                  sigma: float = 0.25) -> torch.Tensor:
    """The analytic position maps, materialised: ``[M, height, width]`` (for plotting and for
    the reference path; the fused loss never builds them).

    Args:
        kinds: a map kind or a sequence of them (see :mod:`idd_ops.position`); "sinusoidal"
            contributes ``4 * num_frequencies`` maps, every other kind one.
        height, width: map size. Kinds that divide by ``size - 1`` need that size >= 2.
        dtype, device: of the result. Defaults: float32, CPU.
        num_frequencies: frequencies of "sinusoidal" (1, 2, 4, ... periods per image). Default: 2.
        num_stripes: bands of the stripe maps. Default: 4.
        sigma: width of "gaussian" as a fraction of the image size. Default: 0.25.
    """
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name}: expected an int >= 0, got {n!r}")
        if n < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {n}")
    elements, params, labels = expand_kinds(kinds, num_frequencies, num_stripes, sigma)
    check_size(elements, labels, height, width)
    maps = [_factor(e, p, height, 0, device)[:, None] * _factor(e, p, width, 1, device)[None]
            for e, p in zip(elements, params)]
    return torch.stack(maps).to(dtype)


def num_maps(kinds: Kinds, num_frequencies: int = 2) -> int:
    """How many maps (output channels) ``kinds`` expands to."""
    return len(expand_kinds(kinds, num_frequencies)[0])
