"""Plain-PyTorch versions of every idd_ops function: readable, unfused, the tests' truth.

They follow METHOD.md literally: labels are resized with F.interpolate, classes become a
one-hot mask, and autograd differentiates everything.
"""
import torch
import torch.nn.functional as F

from ._ops import acc_dtype


def resize_labels(labels, size):
    """Labels ``[B, Hy, Wy]`` -> ``[B, H, W]`` by nearest neighbour (F.interpolate's rule)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].double(), size=tuple(size), mode="nearest")[:, 0].long()


def _centroids(features, labels, num_classes, ignore_index):
    B, C, H, W = features.shape
    y = resize_labels(labels, (H, W)).reshape(B, H * W)
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if bad.any():
        raise ValueError(f"labels: value {y[bad][0].item()} is outside [0, num_classes={num_classes}) "
                         f"and is not ignore_index={ignore_index}")
    slot = torch.where(y == ignore_index, torch.full_like(y, num_classes), y)
    onehot = F.one_hot(slot, num_classes + 1)[..., :num_classes].to(acc_dtype(features.dtype))  # [B, HW, K]
    counts = onehot.sum(1)
    sums = torch.einsum("bpk,bcp->bkc", onehot, features.reshape(B, C, H * W).to(onehot.dtype))
    return sums / counts.clamp_min(1)[..., None], counts.long()


def class_centroids(features, labels, num_classes, ignore_index=255):
    """Reference of :func:`idd_ops.class_centroids`."""
    centroids, counts = _centroids(features, labels, num_classes, ignore_index)
    return centroids.to(features.dtype), counts


def _valid_entries(counts):
    present = counts > 0
    K = counts.shape[1]
    off_diag = ~torch.eye(K, dtype=torch.bool, device=counts.device)
    return present[:, :, None] & present[:, None, :] & off_diag


def class_distance_matrix(centroids, counts, metric="euclidean", normalize=None, eps=1e-8):
    """Reference of :func:`idd_ops.class_distance_matrix`."""
    c = centroids.to(acc_dtype(centroids.dtype))
    valid = _valid_entries(counts)
    if metric == "cosine":
        norm = torch.linalg.vector_norm(c, dim=-1)
        denom = (norm[:, :, None] * norm[:, None, :]).clamp_min(eps)
        d = 1 - c @ c.transpose(1, 2) / denom
    else:
        sq = (c[:, :, None, :] - c[:, None, :, :]).pow(2).sum(-1)
        if metric == "sqeuclidean":
            d = sq
        else:  # euclidean; the where() keeps the gradient at zero distance at 0
            d = torch.where(sq > 0, torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    d = torch.where(valid, d, torch.zeros_like(d))
    if normalize == "mean":
        n = valid.sum((1, 2))
        mean = d.sum((1, 2)) / n.clamp_min(1)
        m = torch.where(n > 0, mean.clamp_min(eps), torch.ones_like(mean))
        d = d / m[:, None, None]
    return d.to(centroids.dtype)


def inter_class_distance_loss(student_feats, teacher_feats, labels, num_classes, ignore_index=255,
                              metric="euclidean", normalize=None, reduction="mean", eps=1e-8):
    """Reference of :func:`idd_ops.inter_class_distance_loss`."""
    cs, ns = _centroids(student_feats, labels, num_classes, ignore_index)
    ct, nt = _centroids(teacher_feats.detach(), labels, num_classes, ignore_index)
    ds = class_distance_matrix(cs, ns, metric, normalize, eps)
    dt = class_distance_matrix(ct, nt, metric, normalize, eps).to(ds.dtype)
    upper = torch.ones(num_classes, num_classes, dtype=torch.bool, device=ds.device).triu(1)
    valid = _valid_entries(ns) & _valid_entries(nt) & upper
    err = torch.where(valid, (ds - dt).pow(2), torch.zeros_like(ds))
    per_image, n = err.sum((1, 2)), valid.sum((1, 2))
    if reduction == "sum":
        loss = per_image.sum()
    elif reduction == "none":
        loss = per_image / n.clamp_min(1)
    else:
        loss = per_image.sum() / n.sum().clamp_min(1)
    return loss.to(student_feats.dtype)


def position_encoding_loss(pred, kinds, reduction="mean", num_frequencies=2, num_stripes=4, sigma=0.25):
    """Reference of :func:`idd_ops.position_encoding_loss`: materialise the maps, then MSE."""
    from .position import position_maps

    maps = position_maps(kinds, pred.shape[2], pred.shape[3], dtype=acc_dtype(pred.dtype), device=pred.device,
                         num_frequencies=num_frequencies, num_stripes=num_stripes, sigma=sigma)
    loss = F.mse_loss(pred.to(maps.dtype), maps.expand(pred.shape[0], -1, -1, -1), reduction=reduction)
    return loss.to(pred.dtype)
