"""Outputs of the CPU-dispatched kernels (softmax-KL, centroid pass, cosine pass), the cosine pass
using the centroids, forward and backward, on fixed inputs, saved for comparison across CPU
variants and CPUs:

    IDD_OPS_CPU_CAPABILITY=default python tests/cpu_variant_outputs.py out.pt

Sizes leave vector tails and span several softmax-KL tiles; every floating dtype is covered.
Inputs are integers scaled by powers of two (torch's own randn differs across CPU capabilities).
"""
import sys

import torch

import idd_ops  # noqa: F401  (registers torch.ops.idd_ops)

ops = torch.ops.idd_ops
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def uniform(shape, g, scale=1.0):
    """Values in [-scale, scale) on a 2^-12 grid, the same on every CPU."""
    return torch.randint(-4096, 4096, shape, generator=g).double() * (scale / 4096)


def outputs():
    g = torch.Generator().manual_seed(0)
    out = {"capability": ops._cpu_capability()}
    for dtype in DTYPES:
        name = str(dtype).split(".")[-1]
        # softmax-KL: contiguous vectors (inner 1) and strided ones over more than one tile
        for shape in [(3, 203, 1), (2, 19, 2100)]:
            s = uniform(shape, g, 8.0).to(dtype)
            t = uniform(shape, g, 8.0).to(dtype)
            kl, ls, lt = ops.softmax_kl(s, t, 2.0)
            grad = uniform(kl.shape, g).to(kl.dtype)
            out[f"softmax_kl {name} {shape}"] = (kl, ls, lt, ops._softmax_kl_backward(grad, s, t, ls, lt, 2.0))
        # centroid and cosine passes: labels at twice the feature resolution, some ignored
        feats = uniform((2, 13, 21, 37), g, 2.0).to(dtype)
        labels = torch.randint(0, 5, (2, 42, 74), generator=g)
        labels[:, :, 30:33] = 255
        labels[:, 10:40, 5:50] = 3  # long runs: the vectorised span sums
        centroids, counts = ops.class_centroids(feats, labels, 5, 255)
        cos, norms = ops.pixel_centroid_cosine(feats, centroids, labels, 255, 1e-8)
        grad = uniform(cos.shape, g).to(cos.dtype)
        out[f"centroids {name}"] = (centroids, counts)
        out[f"cosine {name}"] = (cos, norms) + tuple(
            ops._pixel_centroid_cosine_backward(grad, feats, centroids, labels, cos, norms, 255, 1e-8))
        # the slot map's op with the centroids' own counts: the backward's share pass too
        slots = ops._label_slots(labels, 21, 37, 5, 255)
        cos, norms = ops._pixel_centroid_cosine_slots(feats, centroids, slots, 1e-8, counts)
        out[f"cosine slots {name}"] = (cos, norms) + tuple(
            ops._pixel_centroid_cosine_slots_backward(grad, feats, centroids, slots, cos, norms, 1e-8, counts))
    return out


if __name__ == "__main__":
    torch.save(outputs(), sys.argv[1])
