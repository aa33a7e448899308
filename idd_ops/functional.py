"""Public functions of idd_ops, in the style of torch.nn.functional.

Shapes: B images, C channels, H x W feature map, Hy x Wy label map, K classes.
Every function validates its arguments (shape, dtype, device, option strings) without
reading tensor values; labels outside [0, K) that are not ignore_index raise a ValueError
from the CPU kernel and stop the CUDA kernel with a device-side assert (as nll_loss does:
checking on the host would need a sync).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers autograd and fake kernels)
from . import _validation as v
from ._class_sums import centroids_from_sums, idd_from_sums, pair_sums, slots_for, uses_class_sums
from ._distributed import check_process_group, pooled_centroids, pooled_sums
from ._dtypes import loss_dtype

ops = torch.ops.idd_ops


def class_centroids(feats: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255,
                    size: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
    """Per-image mean feature of every class.

    Args:
        feats: ``[B, C, H, W]`` float16/bfloat16/float32/float64, NCHW or channels_last; or
            ``[B, N, C]`` tokens (ViT/SegFormer) of an ``H x W`` map with ``size=(H, W)``, viewed as
            a channels_last map (read in place on the class-sum path, docs/ARCHITECTURE.md).
        labels: ``[B, Hy, Wy]`` integer class map. When ``(Hy, Wy) != (H, W)`` it is resized
            on the fly by nearest neighbour, exactly as
            ``F.interpolate(labels[:, None].float(), size=(H, W), mode="nearest")``.
        num_classes: K, the number of classes (int >= 1).
        ignore_index: label of pixels that belong to no class. Default: 255.
        size: ``(H, W)`` of token features (``N == H * W``); unused for ``[B, C, H, W]``
            features. Default: None.

    Returns:
        ``(centroids, counts)``: ``centroids [B, K, C]`` in ``feats.dtype`` (accumulated in
        float32, or float64 for float64 input; in float64 for every dtype where the class-sum
        path reads the features: channels_last and tokens, docs/API.md), 0 for a class absent
        from an image;
        ``counts [B, K]`` int64, the number of feature pixels of each class.
        Differentiable w.r.t. ``feats``.
    """
    (fmap,) = v.feature_maps(size, ("feats", feats))
    v.check_labels(labels, "feats", fmap)
    v.check_num_classes(num_classes, ignore_index)
    if uses_class_sums(num_classes, fmap):
        sums, counts = ops.class_sums(fmap, slots_for(labels, fmap, num_classes, ignore_index), num_classes)
        return centroids_from_sums(sums, counts, feats.dtype), counts
    centroids, counts = ops.class_centroids(fmap, labels, num_classes, ignore_index)
    return centroids.to(feats.dtype), counts


def class_distance_matrix(centroids: Tensor, counts: Tensor, metric: str = "euclidean", normalize: Optional[str] = None,
                          eps: float = 1e-8) -> Tensor:
    """Pairwise distances between the class centroids of each image.

    Args:
        centroids: ``[B, K, C]`` floating, e.g. from :func:`class_centroids`.
        counts: ``[B, K]`` integer; a class with count 0 (or below) is absent.
        metric: ``"euclidean"`` (default, gradient 0 at zero distance), ``"sqeuclidean"`` or
            ``"cosine"`` (``1 - <ci, cj> / max(|ci| |cj|, eps)``).
        normalize: ``None`` (default) or ``"mean"``: divide each image's matrix by
            ``max(mean of its valid off-diagonal entries, eps)``.
        eps: floor of the cosine denominator and of the ``"mean"`` normaliser. Default: 1e-8.

    Returns:
        ``[B, K, K]`` in ``centroids.dtype``: symmetric, zero diagonal, zero (and no gradient)
        in every row and column of an absent class.
    """
    v.check_centroids(centroids, counts)
    v.check_choice("metric", metric, v.METRICS)
    v.check_choice("normalize", normalize, v.NORMALIZE)
    v.check_eps(eps)
    return ops.class_distance_matrix(centroids, counts.long(), metric, normalize == "mean", float(eps))


def inter_class_distance_loss(student_feats: Tensor, teacher_feats: Tensor, labels: Tensor, num_classes: int,
                              ignore_index: int = 255, metric: str = "euclidean", normalize: Optional[str] = None,
                              reduction: str = "mean", eps: float = 1e-8, centroids: str = "image",
                              process_group: Optional[object] = None,
                              size: Optional[Tuple[int, int]] = None) -> Tensor:
    """Inter-class distance distillation (IDD) loss.

    The student is trained so that the distances between its per-image class centroids
    match the teacher's: ``E = (D_S - D_T)^2`` over pairs ``i < j`` of classes present in the
    image for both networks.

    Args:
        student_feats: ``[B, Cs, Hs, Ws]`` floating (NCHW or channels_last), or ``[B, N, Cs]``
            tokens with ``size=(Hs, Ws)``.
        teacher_feats: ``[B, Ct, Ht, Wt]`` floating, or ``[B, N, Ct]`` tokens with ``size``;
            channels and size may differ from the student's (as a map; two token inputs share the
            one ``size``, so they must tile the same grid). Treated as a constant: no gradient
            reaches it.
        labels: ``[B, Hy, Wy]`` integer; resized (nearest) to each network's feature size.
        num_classes: K (int >= 1).
        ignore_index: label of unlabelled pixels. Default: 255.
        metric, normalize, eps: as in :func:`class_distance_matrix`.
        reduction: ``"mean"`` (default): sum of E over all valid pairs of the batch divided by
            their number; ``"sum"``; ``"none"``: ``[B]``, each image's mean over its own pairs.
            Without any valid pair the result is 0 with zero gradient.
        centroids: ``"image"`` (default, METHOD.md): one centroid set per image, no
            communication. ``"batch"``: one centroid set per class over the whole batch (one
            K x K matrix; ``"none"`` then gives ``[1]``).
        process_group: with ``centroids="batch"``, a torch.distributed process group (e.g.
            ``torch.distributed.group.WORLD``) over which per-class sums and counts are
            all-reduced, so every rank sees the centroids of the global batch. The all-reduce is
            differentiable; under DistributedDataParallel (which averages gradients over
            ranks) the gradients equal a single process's on the concatenated batch.
        size: ``(H, W)`` of whichever input is ``[B, N, C]`` tokens (``N == H * W``; both, when
            both are), viewed as a channels_last map. Default: None (no token input).

    Returns:
        The loss in ``student_feats.dtype`` (float32 for half inputs under autocast): a
        scalar, or ``[B]`` for ``"none"``.
    """
    fs, ft = v.feature_maps(size, ("student_feats", student_feats), ("teacher_feats", teacher_feats))
    v.check_pair(fs, ft)
    v.check_labels(labels, "student_feats", fs)
    v.check_idd_options(num_classes, ignore_index, metric, normalize, reduction, eps, centroids)
    check_process_group(process_group, centroids)
    if uses_class_sums(num_classes, fs, ft):
        ss, ns, st, nt = pair_sums(fs, ft.detach(), labels, num_classes, ignore_index)
        if centroids == "batch":
            ss, ns = pooled_sums(ss, ns, process_group)
            with torch.no_grad():
                st, nt = pooled_sums(st, nt, process_group)
        return idd_from_sums(ss, ns, st, nt, metric, normalize, eps, reduction, loss_dtype(student_feats))
    mean = normalize == "mean"
    cs, ns = ops.class_centroids(fs, labels, num_classes, ignore_index)
    ct, nt = ops.class_centroids(ft.detach(), labels, num_classes, ignore_index)
    if centroids == "batch":
        cs, ns = pooled_centroids(cs, ns, process_group)
        with torch.no_grad():
            ct, nt = pooled_centroids(ct, nt, process_group)
    ds = ops.class_distance_matrix(cs, ns, metric, mean, float(eps))
    dt = ops.class_distance_matrix(ct, nt, metric, mean, float(eps))
    loss = ops.idd_loss(ds, dt.to(ds.dtype), ns, nt, reduction)
    return loss.to(loss_dtype(student_feats))


__all__ = ["class_centroids", "class_distance_matrix", "inter_class_distance_loss"]
