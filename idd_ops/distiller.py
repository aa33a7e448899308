"""A drop-in helper that adds IDD (and PID, pixel KD, the baselines) to an existing training loop."""
import inspect
import numbers
import warnings
from types import ModuleType, SimpleNamespace
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _validation as v
from . import baselines, functional
from .nn import ChannelWiseDistillationLoss, PositionDistillationLoss

# The functional losses Distiller calls; idd_ops.reference has the same names.
LIB_FUNCTIONS = ("inter_class_distance_loss", "pixel_kd_loss", "structural_kd_loss", "intra_class_variation_loss")


def _functions(lib) -> SimpleNamespace:
    """`lib`'s losses as a namespace of functions: a Distiller holding a module object (such as
    idd_ops.reference) could not be deep-copied, pickled or torch.save'd."""
    return SimpleNamespace(**{name: getattr(lib, name) for name in LIB_FUNCTIONS})


FUSED = SimpleNamespace(inter_class_distance_loss=functional.inter_class_distance_loss,
                        pixel_kd_loss=baselines.pixel_kd_loss, structural_kd_loss=baselines.structural_kd_loss,
                        intra_class_variation_loss=baselines.intra_class_variation_loss)


class FeatureHook:
    """Keeps the output of one named submodule of a model on every forward."""

    def __init__(self, model, name, role="model"):
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"layer {name!r} not found; named modules are e.g. {names[:12]}") from e
        self.name, self.role, self.output, self.version, self.removed = name, role, None, None, False
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        # the version counter tells pop() whether a later op changed the output in place (eager
        # only: torch.compile cannot guard on it)
        self.output = output
        self.version = None if torch.compiler.is_compiling() else getattr(output, "_version", None)

    def pop(self):
        out, self.output = self.output, None
        if out is None:
            why = "its hook was removed (remove_hooks)" if self.removed else "it did not run in the last forward"
            raise RuntimeError(f"no features from the {self.role}'s layer {self.name!r}: {why}")
        if self.version is not None and out._version != self.version:
            # e.g. BatchNorm followed by ReLU(inplace=True): the kept tensor now holds the ReLU's
            # output, and a loss on it would silently distil other features than the layer's
            raise RuntimeError(f"the {self.role}'s layer {self.name!r}: its output was changed in place after the "
                               "layer returned it (by a later in-place op, e.g. ReLU(inplace=True)), so it no longer "
                               "holds the layer's features; name the layer whose output you want after the in-place "
                               "op (e.g. the ReLU), or make that op out of place (inplace=False)")
        return out

    def remove(self):
        self.handle.remove()
        self.output, self.removed = None, True  # an output kept from before is stale from now on


def _logits(output, role):
    """A model's logits: its output, or the "out" entry of a dict (torchvision's segmentation
    models return {"out": ..., "aux": ...})."""
    if isinstance(output, Mapping):
        if "out" not in output:
            raise ValueError(f"the {role} returned a dict without an 'out' entry (keys {sorted(output)}); "
                             "expected logits [B, K, h, w] or a dict with them under 'out'")
        return output["out"]
    return output


class Distiller(nn.Module):
    """Teacher -> student distillation around two existing models.

    Forward hooks capture the features of ``student_layer`` and ``teacher_layer``. The teacher is
    frozen by the distiller itself: put in eval mode with ``requires_grad_(False)`` at
    construction, and run in eval mode under ``torch.no_grad()`` on every forward, whatever
    ``train()``/``eval()`` calls came before (its BatchNorm statistics and weights never change).
    Calling the distiller runs both models and returns the student's output and a dict of
    weighted losses (``"total"`` is their sum); add your own task loss (e.g. cross-entropy) to
    ``losses["total"]``.

    Args:
        teacher, student: ``nn.Module``s mapping images to logits ``[B, K, h, w]``, or to a
            dict with them under ``"out"`` (torchvision's segmentation models; the student's
            output is returned as the model gave it). Every other argument is keyword-only.
        teacher_layer, student_layer: names (as in ``named_modules()``) of the layers whose
            ``[B, C, H, W]`` outputs feed IDD, PID, CWD, SKD and IFVD. A later in-place op must
            not change that output (e.g. a BatchNorm followed by ``ReLU(inplace=True)``: name
            the ReLU): the forward raises a RuntimeError where one did. A student whose
            features carry no gradient in training (reentrant checkpointing) gets a warning.
        num_classes: K. ignore_index: Default 255.
        weights: loss name -> weight; names: ``"idd"``, ``"pid"``, ``"kd"`` (pixel KD on
            logits), ``"skd"``, ``"ifvd"``, ``"cwd"``. Default: ``{"idd": 1.0}``. A weight of 0
            skips that loss.
        pid: a :class:`~idd_ops.nn.PositionDistillationLoss` (needed when ``"pid"`` is weighted).
        idd_options: extra keyword arguments for :func:`idd_ops.inter_class_distance_loss`.
        lib: where the functional losses come from: None (default) for the fused ones, or
            ``idd_ops.reference`` (to compare speed or values with plain PyTorch); ``idd_ops``
            itself works too. It covers IDD, pixel KD, SKD and IFVD; PID and CWD run as the
            modules given in ``pid`` and ``cwd``.
        kd_temperature: Default 1.0. kd_ignore: leave ignored pixels out of pixel KD (default
            False: all B*H*W pixels, the CIRKD convention that lambda_kd = 10 assumes). cwd: a :class:`~idd_ops.nn.ChannelWiseDistillationLoss`
            (needed when ``"cwd"`` is weighted).

    Example:
        >>> import torch, torch.nn.functional as F, idd_ops
        >>> def net(width):  # images [B, 3, H, W] -> logits [B, 4, H/2, W/2]
        ...     return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, stride=2, padding=1),
        ...                                torch.nn.BatchNorm2d(width), torch.nn.ReLU(), torch.nn.Conv2d(width, 4, 1))
        >>> teacher, student = net(16), net(8)
        >>> distiller = idd_ops.Distiller(teacher, student, teacher_layer="2", student_layer="2",
        ...                               num_classes=4, weights={"idd": 1.0, "kd": 10.0})
        >>> images, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2, 16, 16))
        >>> logits, losses = distiller(images, labels)  # logits at feature resolution: upsample for CE
        >>> logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        >>> loss = F.cross_entropy(logits, labels, ignore_index=255) + losses["total"]
        >>> loss.backward()
        >>> sorted(losses)
        ['idd', 'kd', 'total']
    """

    LOSSES = ("idd", "pid", "kd", "skd", "ifvd", "cwd")

    def __init__(self, teacher: nn.Module, student: nn.Module, *, teacher_layer: str, student_layer: str,
                 num_classes: int, ignore_index: int = 255, weights: Optional[Mapping[str, float]] = None,
                 pid: Optional[nn.Module] = None, idd_options: Optional[Mapping[str, object]] = None,
                 kd_temperature: float = 1.0, cwd: Optional[nn.Module] = None, kd_ignore: bool = False,
                 lib: Optional[Union[ModuleType, SimpleNamespace]] = None):
        super().__init__()
        weights = {"idd": 1.0} if weights is None else dict(weights)
        unknown = set(weights) - set(self.LOSSES)
        if unknown:
            raise ValueError(f"weights: unknown losses {sorted(unknown)}; expected any of {self.LOSSES}")
        if weights.get("pid") and pid is None:
            raise ValueError("pid: a PositionDistillationLoss is needed when weights['pid'] is set")
        if weights.get("cwd") and cwd is None:
            raise ValueError("cwd: a ChannelWiseDistillationLoss is needed when weights['cwd'] is set")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise TypeError(f"weights: {name!r} needs a real number (a Python or NumPy int or float), got "
                                f"{type(w).__name__} {w!r}")
            if not 0 <= w < float("inf"):
                raise ValueError(f"weights: {name!r} needs a finite weight >= 0, got {w!r}")
        v.check_num_classes(num_classes, ignore_index)
        v.check_temperature(kd_temperature, "kd_temperature")
        params = inspect.signature(functional.inter_class_distance_loss).parameters
        unknown = set(idd_options or {}) - (set(params) - {"student_feats", "teacher_feats", "labels", "num_classes",
                                                           "ignore_index"})
        if unknown:
            raise ValueError(f"idd_options: unknown options {sorted(unknown)} for inter_class_distance_loss")
        chosen = {**{k: p.default for k, p in params.items()}, **(idd_options or {})}
        v.check_idd_options(num_classes, ignore_index, *(chosen[k] for k in ("metric", "normalize", "reduction", "eps",
                                                                             "centroids")))
        if not isinstance(kd_ignore, bool):
            raise TypeError(f"kd_ignore: expected True or False, got {kd_ignore!r}")
        for name, module, kind in (("pid", pid, PositionDistillationLoss), ("cwd", cwd, ChannelWiseDistillationLoss)):
            if module is not None and not isinstance(module, kind):
                raise TypeError(f"{name}: expected an idd_ops.nn.{kind.__name__}, got {type(module).__name__}")
        self.teacher, self.student, self.pid, self.cwd = teacher, student, pid, cwd
        self.teacher.eval().requires_grad_(False)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.weights = {k: float(w) for k, w in weights.items() if w}
        self.idd_options = dict(idd_options or {})
        self.kd_temperature, self.kd_ignore = kd_temperature, kd_ignore
        self.lib = FUSED if lib is None else _functions(lib)
        self._hooks = (FeatureHook(student, student_layer, "student"), FeatureHook(teacher, teacher_layer, "teacher"))

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # the teacher stays in inference mode (BatchNorm statistics frozen)
        return self

    def forward(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        out_s = self.student(images)
        self.teacher.eval()  # also undoes a train() called on the teacher or any of its submodules
        with torch.no_grad():
            out_t = self.teacher(images)
        logits_s, logits_t = _logits(out_s, "student"), _logits(out_t, "teacher")
        fs, ft = self._hooks[0].pop(), self._hooks[1].pop()
        if (self.training and torch.is_grad_enabled() and isinstance(fs, Tensor) and not fs.requires_grad
                and any(w for name, w in self.weights.items() if name != "kd")):
            warnings.warn(f"Distiller: the student's features (layer {self._hooks[0].name!r}) do not require grad, so "
                          "the feature losses give the student no gradient: was the layer run under no_grad, or "
                          "under torch.utils.checkpoint with use_reentrant=True (use use_reentrant=False)?",
                          stacklevel=2)
        losses = {}
        for name, w in self.weights.items():
            losses[name] = w * self._loss(name, fs, ft, logits_s, logits_t, labels)
        # with no loss weighted, a zero that still belongs to the student's graph, so that
        # losses["total"].backward() works in every configuration
        losses["total"] = sum(losses.values()) if losses else logits_s.sum() * 0
        return out_s, losses

    def _loss(self, name, fs, ft, logits_s, logits_t, labels):
        K, ign, lib = self.num_classes, self.ignore_index, self.lib
        if name == "idd":
            return lib.inter_class_distance_loss(fs, ft, labels, K, ign, **self.idd_options)
        if name == "pid":
            return self.pid(fs, ft)
        if name == "kd":
            if logits_t.shape[-2:] != logits_s.shape[-2:]:
                logits_t = nn.functional.interpolate(logits_t, size=logits_s.shape[-2:], mode="bilinear",
                                                     align_corners=False)
            return lib.pixel_kd_loss(logits_s, logits_t, labels if self.kd_ignore else None,
                                     temperature=self.kd_temperature, ignore_index=ign)
        if name == "skd":
            return lib.structural_kd_loss(fs, ft)
        if name == "ifvd":
            return lib.intra_class_variation_loss(fs, ft, labels, K, ign)
        return self.cwd(fs, ft)

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
