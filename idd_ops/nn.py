"""nn.Module versions of the idd_ops losses."""
import torch
import torch.nn.functional as TF
from torch import nn

from . import baselines
from . import functional as F
from .position import num_maps, position_encoding_loss


class InterClassDistanceLoss(nn.Module):
    """Inter-class distance distillation loss as a module; see
    :func:`idd_ops.inter_class_distance_loss` for the arguments and their defaults.

    Call: ``loss(student_feats [B,Cs,Hs,Ws], teacher_feats [B,Ct,Ht,Wt], labels [B,Hy,Wy])``.
    """

    def __init__(self, num_classes, ignore_index=255, metric="euclidean", normalize=None, reduction="mean",
                 eps=1e-8):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.metric = metric
        self.normalize = normalize
        self.reduction = reduction
        self.eps = eps

    def forward(self, student_feats, teacher_feats, labels):
        return F.inter_class_distance_loss(student_feats, teacher_feats, labels, self.num_classes, self.ignore_index,
                                           self.metric, self.normalize, self.reduction, self.eps)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, ignore_index={self.ignore_index}, metric={self.metric!r}, "
                f"normalize={self.normalize!r}, reduction={self.reduction!r}")


class PositionEncodingModule(nn.Module):
    """A small conv read-out that regresses position maps from features.

    ``[B, in_channels, H, W]`` -> ``[B, M, H, W]``, M = maps that ``kinds`` expands to.
    Layers: 3x3 conv (zero padding, which is what lets a conv read-out see borders) -> BN ->
    ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv.

    Args:
        in_channels: feature channels.
        kinds: position map kinds (see :mod:`idd_ops.position`).
        hidden: width of the hidden layers. Default: 64.
        num_frequencies: for "sinusoidal" maps. Default: 2.
    """

    def __init__(self, in_channels, kinds, hidden=64, num_frequencies=2):
        super().__init__()
        self.kinds = tuple([kinds] if isinstance(kinds, str) else kinds)
        self.num_frequencies = num_frequencies
        out = num_maps(self.kinds, num_frequencies)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out, 1))

    def forward(self, feats):
        return self.layers(feats)


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

    Call: ``loss(student_feats [B,Cs,Hs,Ws], teacher_feats [B,Ct,Ht,Wt] or None)``.
    """

    def __init__(self, readout, student_channels, teacher_channels=None, variant="teacher", kinds=None, hidden=64):
        super().__init__()
        if variant not in ("teacher", "target"):
            raise ValueError(f"variant: expected 'teacher' or 'target', got {variant!r}")
        self.variant = variant
        if variant == "teacher":
            if readout is None:
                raise ValueError("readout: the 'teacher' variant needs the teacher's trained read-out")
            if teacher_channels is None:
                teacher_channels = readout.layers[0].in_channels
            self.readout = readout.eval().requires_grad_(False)
            self.adapter = (nn.Identity() if student_channels == teacher_channels
                            else nn.Conv2d(student_channels, teacher_channels, 1, bias=False))
        else:
            kinds = kinds if kinds is not None else readout.kinds
            self.kinds = tuple([kinds] if isinstance(kinds, str) else kinds)
            nf = readout.num_frequencies if readout is not None else 2
            self.readout = PositionEncodingModule(student_channels, self.kinds, hidden=hidden, num_frequencies=nf)

    def train(self, mode=True):
        super().train(mode)
        if self.variant == "teacher":
            self.readout.eval()  # frozen: its BatchNorm keeps the teacher's statistics
        return self

    def forward(self, student_feats, teacher_feats=None):
        if self.variant == "target":
            return position_encoding_loss(self.readout(student_feats), self.kinds,
                                          num_frequencies=self.readout.num_frequencies)
        if teacher_feats is None:
            raise ValueError("teacher_feats: required by the 'teacher' variant")
        pred_s = self.readout(self.adapter(student_feats))
        with torch.no_grad():
            pred_t = self.readout(teacher_feats)
        if pred_s.shape[-2:] != pred_t.shape[-2:]:
            pred_s = TF.interpolate(pred_s, size=pred_t.shape[-2:], mode="bilinear", align_corners=False)
        return TF.mse_loss(pred_s, pred_t.to(pred_s.dtype))


class PixelKDLoss(nn.Module):
    """Pixel-wise KD on logits; see :func:`idd_ops.pixel_kd_loss`.
    Call: ``loss(student_logits, teacher_logits, labels=None)``."""

    def __init__(self, temperature=1.0, ignore_index=None):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(self, student_logits, teacher_logits, labels=None):
        return baselines.pixel_kd_loss(student_logits, teacher_logits, self.temperature, self.ignore_index, labels)


class ChannelWiseDistillationLoss(nn.Module):
    """CWD with a 1x1 conv adapter when the student's channel count differs from the teacher's;
    see :func:`idd_ops.channel_wise_distillation_loss`. The adapter is trained with the student.

    Args:
        student_channels, teacher_channels: channel counts. temperature: Default 4.0.
    """

    def __init__(self, student_channels, teacher_channels, temperature=4.0):
        super().__init__()
        self.temperature = temperature
        self.adapter = (nn.Identity() if student_channels == teacher_channels
                        else nn.Conv2d(student_channels, teacher_channels, 1, bias=False))

    def forward(self, student_feats, teacher_feats):
        return baselines.channel_wise_distillation_loss(self.adapter(student_feats), teacher_feats, self.temperature)


class StructuralKDLoss(nn.Module):
    """Pairwise-affinity KD; see :func:`idd_ops.structural_kd_loss`. Default pool 2."""

    def __init__(self, pool=2):
        super().__init__()
        self.pool = pool

    def forward(self, student_feats, teacher_feats):
        return baselines.structural_kd_loss(student_feats, teacher_feats, self.pool)


class IntraClassVariationLoss(nn.Module):
    """IFVD; see :func:`idd_ops.intra_class_variation_loss`.
    Call: ``loss(student_feats, teacher_feats, labels)``."""

    def __init__(self, num_classes, ignore_index=255, eps=1e-8):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.eps = eps

    def forward(self, student_feats, teacher_feats, labels):
        return baselines.intra_class_variation_loss(student_feats, teacher_feats, labels, self.num_classes,
                                                    self.ignore_index, self.eps)
