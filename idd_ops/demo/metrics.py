"""Segmentation metrics: confusion matrix and intersection over union."""
import torch


def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """[K, K] counts, rows = true class, columns = predicted class; ignored pixels left out."""
    keep = label != ignore_index
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf):
    """IoU of each class from a confusion matrix; NaN for a class absent from both labels and
    predictions (it is left out of the mean)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def mean_iou(conf):
    iou = iou_per_class(conf)
    return float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else float("nan")
