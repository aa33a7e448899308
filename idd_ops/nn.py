"""nn.Module versions of the idd_ops losses."""
from torch import nn

from . import functional as F


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
