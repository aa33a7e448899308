"""Measure how much position information features carry: train a position read-out on frozen
features and report its error (lower error = more position information)."""
from typing import Callable, Iterable, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _validation as v
from .demo.progress import Progress
from .nn import PositionEncodingModule
from .position import position_encoding_loss


def probe_position_information(feature_fn: Callable[[object], Tensor], batches: Iterable[object],
                               kinds: Union[str, Sequence[str]], steps: int = 200, lr: float = 1e-2, hidden: int = 64,
                               num_frequencies: int = 2, num_stripes: int = 4, sigma: float = 0.25,
                               progress: bool = False) -> Tuple[PositionEncodingModule, float]:
    """Train a :class:`~idd_ops.nn.PositionEncodingModule` to regress the analytic position
    maps from frozen features, as in Islam et al. (ICLR 2020).

    Args:
        feature_fn: callable mapping one batch to features ``[B, C, H, W]``; run under
            ``torch.no_grad()`` (the network is frozen). The read-out trains with gradients
            enabled even where the caller runs under ``no_grad`` or ``inference_mode``.
        batches: a sequence of inputs for ``feature_fn``, cycled through for training.
        kinds: position map kinds (see :mod:`idd_ops.position`).
        steps: optimisation steps (Adam). Default: 200.
        lr: learning rate. Default: 1e-2.
        hidden: read-out width. Default: 64.
        num_frequencies, num_stripes, sigma: the map options of :func:`idd_ops.position_maps`
            (defaults 2, 4, 0.25); the read-out keeps them.
        progress: show progress on stderr: a bar redrawn in place on a terminal, elsewhere (a
            log file, a pipe) one plain line every 10 % of the steps. Default: False (quiet).

    Returns:
        ``(readout, error)``: the trained read-out (eval mode) and its final mean squared error
        over all ``batches`` (a float).

    Example:
        >>> import torch, idd_ops
        >>> conv = torch.nn.Conv2d(3, 8, 3, padding=1)  # a frozen "network"; zero padding leaks position
        >>> batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
        >>> readout, error = idd_ops.probe_position_information(conv, batches, ["horizontal", "vertical"],
        ...                                                     steps=5, hidden=8)
        >>> readout(conv(batches[0])).shape  # one map per kind
        torch.Size([2, 2, 16, 16])
    """
    v.check_int("steps", steps, 1)
    v.check_positive("lr", lr)
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one batch")
    # the read-out trains here even when the caller evaluates under no_grad or inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        return _probe(feature_fn, batches, kinds, steps, lr, hidden, num_frequencies, num_stripes, sigma, progress)


def _probe(feature_fn, batches, kinds, steps, lr, hidden, num_frequencies, num_stripes, sigma, progress):
    with torch.no_grad():
        feats = [feature_fn(b) for b in batches]
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            got = f"a {f.dim()}-d tensor" if isinstance(f, torch.Tensor) else type(f).__name__
            raise TypeError(f"feature_fn: expected features [B, C, H, W] (a 4-d tensor) for batch {i}, got {got}")
    readout = PositionEncodingModule(feats[0].shape[1], kinds, hidden=hidden, num_frequencies=num_frequencies,
                                     num_stripes=num_stripes, sigma=sigma)
    options = readout.map_options()
    readout = readout.to(device=feats[0].device, dtype=feats[0].dtype)
    opt = torch.optim.Adam(readout.parameters(), lr=lr)
    readout.train()
    bar = Progress(steps, "probe") if progress else None
    for step in range(steps):
        pred = readout(feats[step % len(feats)])
        loss = position_encoding_loss(pred, kinds, **options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(loss=loss.detach())  # read only when a line is written
    readout.eval()
    with torch.no_grad():
        errors = [position_encoding_loss(readout(f), kinds, **options).item() for f in feats]
    return readout, sum(errors) / len(errors)
