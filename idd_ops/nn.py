"""nn.Module versions of the idd_ops losses. Every module takes the options of its function
(same names and defaults) and passes them on."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import _validation as v
from . import baselines
from . import functional as F
from ._position_maps import expand_kinds, kind_tuple
from ._reduction import reduce
from .position import position_encoding_loss


class InterClassDistanceLoss(nn.Module):
    """Inter-class distance distillation loss as a module; see
    :func:`idd_ops.inter_class_distance_loss` for the arguments and their defaults.

    Call: ``loss(student_feats [B,Cs,Hs,Ws], teacher_feats [B,Ct,Ht,Wt], labels [B,Hy,Wy])``, or
    with ``[B, N, C]`` tokens ``loss(..., size=(H, W))``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, metric: str = "euclidean",
                 normalize: Optional[str] = None, reduction: str = "mean", eps: float = 1e-8, centroids: str = "image",
                 process_group: Optional[object] = None):
        super().__init__()
        # the options are checked here as well as at each call: a typo fails where it is made
        v.check_idd_options(num_classes, ignore_index, metric, normalize, reduction, eps, centroids)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.metric = metric
        self.normalize = normalize
        self.reduction = reduction
        self.eps = eps
        self.centroids = centroids
        self.process_group = process_group

    def forward(self, student_feats: Tensor, teacher_feats: Tensor, labels: Tensor,
                size: Optional[Tuple[int, int]] = None) -> Tensor:
        return F.inter_class_distance_loss(student_feats, teacher_feats, labels, self.num_classes, self.ignore_index,
                                           self.metric, self.normalize, self.reduction, self.eps, self.centroids,
                                           self.process_group, size)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, ignore_index={self.ignore_index}, metric={self.metric!r}, "
                f"normalize={self.normalize!r}, reduction={self.reduction!r}, eps={self.eps}, centroids={self.centroids!r}"
                + ("" if self.process_group is None else f", process_group={self.process_group!r}"))


class PositionEncodingModule(nn.Module):
    """A small conv read-out that regresses position maps from features.

    ``[B, in_channels, H, W]`` -> ``[B, M, H, W]``, M = maps that ``kinds`` expands to.
    Layers: 3x3 conv (zero padding, which is what lets a conv read-out see borders) -> BN ->
    ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv.

    Args:
        in_channels: feature channels.
        kinds: position map kinds (see :mod:`idd_ops.position`).
        hidden: width of the hidden layers. Default: 64.
        num_frequencies, num_stripes, sigma: the map options of :func:`idd_ops.position_maps`
            (defaults 2, 4, 0.25), kept with the read-out so its targets can be regenerated.
    """

    def __init__(self, in_channels: int, kinds: Union[str, Sequence[str]], hidden: int = 64, num_frequencies: int = 2,
                 num_stripes: int = 4, sigma: float = 0.25):
        super().__init__()
        v.check_int("in_channels", in_channels, 1)
        v.check_int("hidden", hidden, 1)
        self.kinds = kind_tuple(kinds)
        self.num_frequencies, self.num_stripes, self.sigma = num_frequencies, num_stripes, sigma
        out = len(expand_kinds(self.kinds, num_frequencies, num_stripes, sigma)[0])  # checks every map option
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out, 1))

    def forward(self, feats: Tensor) -> Tensor:
        return self.layers(feats)

    def map_options(self) -> dict:
        """Keyword arguments that regenerate this read-out's target maps."""
        return dict(num_frequencies=self.num_frequencies, num_stripes=self.num_stripes, sigma=self.sigma)

    def extra_repr(self):
        return f"kinds={self.kinds!r}, " + ", ".join(f"{k}={val}" for k, val in self.map_options().items())


class PositionDistillationLoss(nn.Module):
    """Position information distillation (PID), METHOD.md section 5.

    ``variant="teacher"`` (default): ``MSE(R(A(f_S)), R(f_T))`` with ``R`` a read-out trained on
    the teacher (e.g. by :func:`idd_ops.probe_position_information`) and frozen here, and ``A``
    a 1x1 conv adapter when channel counts differ (identity otherwise). The student's
    prediction is resized (bilinear) to the teacher's map size when the two differ.

    ``variant="target"``: ``position_encoding_loss(R_S(f_S), kinds)`` with a student read-out
    ``R_S`` trained jointly (teacher-free; kept for ablation). ``readout`` may then be None.

    Args:
        readout: the teacher's read-out (a :class:`PositionEncodingModule`).
        student_channels: student feature channels.
        teacher_channels: teacher feature channels. Default: the read-out's input channels.
        variant: ``"teacher"`` or ``"target"``. Default: ``"teacher"``.
        kinds: map kinds for ``"target"``. Default: the read-out's kinds.
        hidden: width of the student read-out of ``"target"``. Default: 64.
        reduction: ``"mean"`` (default, over all ``B*M*H*W`` map elements), ``"sum"`` or
            ``"none"`` (``[B, M, H, W]``).

    Call: ``loss(student_feats [B,Cs,Hs,Ws], teacher_feats [B,Ct,Ht,Wt] or None)``.
    """

    def __init__(self, readout: Optional[PositionEncodingModule], student_channels: int,
                 teacher_channels: Optional[int] = None, variant: str = "teacher",
                 kinds: Optional[Union[str, Sequence[str]]] = None, hidden: int = 64, reduction: str = "mean"):
        super().__init__()
        v.check_choice("variant", variant, ("teacher", "target"))
        v.check_choice("reduction", reduction, v.REDUCTIONS)
        v.check_int("student_channels", student_channels, 1)
        if readout is not None and not isinstance(readout, PositionEncodingModule):
            raise TypeError(f"readout: expected a PositionEncodingModule, got {type(readout).__name__}")
        self.variant, self.reduction, self.student_channels = variant, reduction, student_channels
        if variant == "teacher":
            if readout is None:
                raise ValueError("readout: the 'teacher' variant needs the teacher's trained read-out")
            read_channels = readout.layers[0].in_channels
            if teacher_channels is None:
                teacher_channels = read_channels
            v.check_int("teacher_channels", teacher_channels, 1)
            if teacher_channels != read_channels:
                raise ValueError(f"teacher_channels: {teacher_channels}, but the read-out was trained on "
                                 f"{read_channels}-channel teacher features")
            self.readout = readout.eval().requires_grad_(False)
            self.adapter = (nn.Identity() if student_channels == teacher_channels
                            else nn.Conv2d(student_channels, teacher_channels, 1, bias=False))
        else:
            if kinds is None and readout is None:
                raise ValueError("kinds: the 'target' variant needs the position map kinds, given as kinds= or "
                                 "through a readout")
            kinds = kinds if kinds is not None else readout.kinds
            self.kinds = kind_tuple(kinds)
            options = readout.map_options() if readout is not None else {}
            self.readout = PositionEncodingModule(student_channels, self.kinds, hidden=hidden, **options)

    def extra_repr(self):
        return f"variant={self.variant!r}, reduction={self.reduction!r}" + (
            f", kinds={self.kinds!r}" if self.variant == "target" else "")

    def train(self, mode=True):
        super().train(mode)
        if self.variant == "teacher":
            self.readout.eval()  # frozen: its BatchNorm keeps the teacher's statistics
        return self

    def forward(self, student_feats: Tensor, teacher_feats: Optional[Tensor] = None) -> Tensor:
        if self.variant == "target":
            return position_encoding_loss(self.readout(student_feats), self.kinds, reduction=self.reduction,
                                          **self.readout.map_options())
        if teacher_feats is None:
            raise ValueError("teacher_feats: required by the 'teacher' variant")
        v.check_module_features("student_feats", student_feats, self.student_channels)
        v.check_module_features("teacher_feats", teacher_feats, self.readout.layers[0].in_channels)
        v.check_pair(student_feats, teacher_feats)
        pred_s = self.readout(self.adapter(student_feats))
        with torch.no_grad():
            pred_t = self.readout(teacher_feats)
        if pred_s.shape[-2:] != pred_t.shape[-2:]:
            pred_s = TF.interpolate(pred_s, size=pred_t.shape[-2:], mode="bilinear", align_corners=False)
        return reduce(TF.mse_loss(pred_s, pred_t.to(pred_s.dtype), reduction="none"), self.reduction)


class PixelKDLoss(nn.Module):
    """Pixel-wise KD on logits; see :func:`idd_ops.pixel_kd_loss` (same options and defaults).
    Call: ``loss(student_logits, teacher_logits, labels=None)``."""

    def __init__(self, temperature: float = 1.0, ignore_index: int = 255, reduction: str = "mean"):
        super().__init__()
        v.check_temperature(temperature)
        v.check_int("ignore_index", ignore_index)
        v.check_choice("reduction", reduction, v.REDUCTIONS)
        self.temperature, self.ignore_index, self.reduction = temperature, ignore_index, reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return baselines.pixel_kd_loss(student_logits, teacher_logits, labels, self.temperature, self.ignore_index,
                                       self.reduction)

    def extra_repr(self):
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class ChannelWiseDistillationLoss(nn.Module):
    """CWD with a 1x1 conv adapter (trained with the student) when the student's channel count
    differs from the teacher's; see :func:`idd_ops.channel_wise_distillation_loss`.

    Args:
        student_channels, teacher_channels: channel counts Cs and Ct.
        temperature: Default 4.0.
        reduction: ``"mean"`` (default), ``"sum"``, or ``"none"`` (``[B, Ct]`` per-channel values).
        normalizer: what ``"mean"`` divides the summed KL by, when an adapter maps Cs to Ct
            channels: ``"student_channels"`` (default: ``B*Cs``, CIRKD's convention, which
            counts the student's channels before the adapter, so loss weights tuned there carry
            over) or ``"teacher_channels"`` (``B*Ct``, the mean over the distilled channels,
            which does not change with the student's width). Equal channel counts make the two
            the same.
    """

    NORMALIZERS = ("student_channels", "teacher_channels")

    def __init__(self, student_channels: int, teacher_channels: int, temperature: float = 4.0,
                 reduction: str = "mean", normalizer: str = "student_channels"):
        super().__init__()
        v.check_int("student_channels", student_channels, 1)
        v.check_int("teacher_channels", teacher_channels, 1)
        v.check_temperature(temperature)
        v.check_choice("reduction", reduction, v.REDUCTIONS)
        v.check_choice("normalizer", normalizer, self.NORMALIZERS)
        self.temperature, self.reduction, self.normalizer = temperature, reduction, normalizer
        self.student_channels = student_channels
        self.adapter = (nn.Identity() if student_channels == teacher_channels
                        else nn.Conv2d(student_channels, teacher_channels, 1, bias=False))

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        v.check_module_features("student_feats", student_feats, self.student_channels)
        B, Cs = student_feats.shape[:2]
        if self.reduction != "mean" or self.normalizer == "teacher_channels":
            return baselines.channel_wise_distillation_loss(self.adapter(student_feats), teacher_feats,
                                                            self.temperature, self.reduction)
        total = baselines.channel_wise_distillation_loss(self.adapter(student_feats), teacher_feats, self.temperature,
                                                         "sum")
        return total / max(B * Cs, 1)

    def extra_repr(self):
        return f"temperature={self.temperature}, reduction={self.reduction!r}, normalizer={self.normalizer!r}"


class StructuralKDLoss(nn.Module):
    """Pairwise-affinity KD; see :func:`idd_ops.structural_kd_loss`. Defaults: pool 2, "mean"."""

    def __init__(self, pool: int = 2, reduction: str = "mean"):
        super().__init__()
        v.check_int("pool", pool, 1)
        v.check_choice("reduction", reduction, v.REDUCTIONS)
        self.pool, self.reduction = pool, reduction

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        return baselines.structural_kd_loss(student_feats, teacher_feats, self.pool, self.reduction)

    def extra_repr(self):
        return f"pool={self.pool}, reduction={self.reduction!r}"


class IntraClassVariationLoss(nn.Module):
    """IFVD; see :func:`idd_ops.intra_class_variation_loss` (same options and defaults).
    Call: ``loss(student_feats, teacher_feats, labels)``, or with tokens ``loss(..., size=(H, W))``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, eps: float = 1e-8, reduction: str = "mean"):
        super().__init__()
        v.check_num_classes(num_classes, ignore_index)
        v.check_eps(eps)
        v.check_choice("reduction", reduction, v.REDUCTIONS)
        self.num_classes, self.ignore_index, self.eps, self.reduction = num_classes, ignore_index, eps, reduction

    def forward(self, student_feats: Tensor, teacher_feats: Tensor, labels: Tensor,
                size: Optional[Tuple[int, int]] = None) -> Tensor:
        return baselines.intra_class_variation_loss(student_feats, teacher_feats, labels, self.num_classes,
                                                    self.ignore_index, self.eps, self.reduction, size)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, ignore_index={self.ignore_index}, eps={self.eps}, "
                f"reduction={self.reduction!r}")


__all__ = ["ChannelWiseDistillationLoss", "InterClassDistanceLoss", "IntraClassVariationLoss", "PixelKDLoss",
           "PositionDistillationLoss", "PositionEncodingModule", "StructuralKDLoss"]
