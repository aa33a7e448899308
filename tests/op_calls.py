"""Every op of idd_ops as one call, forward and backward, on small inputs: for the tests that
run the same call in different settings (a side stream, a CUDA graph, a second device).

OPS[name](device) -> (inputs, run): run(*inputs) zeroes inputs[0].grad, computes the op,
backpropagates a weighted sum of its output and returns [output, inputs[0].grad]. Inputs are
built on the CPU from a seed, so every device gets the same values. CALLS[name] = (inputs,
forward): the same call without the backward.
"""
import torch

import idd_ops

KINDS = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _labels(B, H, W, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, K, (B, H // 4, W // 4), generator=g)
    y = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    y[torch.rand(B, H, W, generator=g) < 0.05] = 255
    return y


def _backward(out, x):
    weight = torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=torch.float64).view(out.shape)
    (out.double() * weight).sum().backward()
    return [out, x.grad]


def _runner(fn):
    def run(*inputs):
        inputs[0].grad = None
        out = fn(*inputs)
        return _backward(out, inputs[0])
    return run


def _op(inputs, fn):
    def make(device):
        # copies, so that requires_grad_ never marks the shared CPU inputs (a CUDA copy of one
        # that requires grad is no leaf, and its .grad stays None)
        moved = [t.detach().to(device, copy=True) for t in inputs]
        moved[0].requires_grad_()
        return moved, _runner(fn)
    return make


B, Cs, Ct, H, W, K = 2, 24, 40, 32, 64, 7
CALLS = {
    "class_centroids": ([_randn(B, Ct, H, W), _labels(B, 2 * H, 2 * W, K)],
                        lambda x, y: idd_ops.class_centroids(x, y, K)[0]),
    "class_distance_matrix": ([_randn(B, K, Cs), torch.tensor([[3, 0, 1, 5, 2, 2, 9]] * B)],
                              lambda c, n: idd_ops.class_distance_matrix(c, n, normalize="mean")),
    "idd_loss": ([_randn(B, Cs, H, W), _randn(B, Ct, H, W, seed=1), _labels(B, 2 * H, 2 * W, K)],
                 lambda s, t, y: idd_ops.inter_class_distance_loss(s, t, y, K, reduction="none")),
    "ifvd": ([_randn(B, Cs, H, W), _randn(B, Ct, H, W, seed=1), _labels(B, 2 * H, 2 * W, K)],
             lambda s, t, y: idd_ops.intra_class_variation_loss(s, t, y, K)),
    "position_loss": ([torch.rand(B, len(KINDS), H, W, generator=torch.Generator().manual_seed(0))],
                      lambda p: idd_ops.position_encoding_loss(p, KINDS, reduction="none")),
    # labels at twice the logits' size: the mask of kept pixels goes through the nearest resize
    "pixel_kd": ([_randn(B, K, H, W), _randn(B, K, H, W, seed=1), _labels(B, 2 * H, 2 * W, K)],
                 lambda s, t, y: idd_ops.pixel_kd_loss(s, t, y, temperature=2.0)),
    "cwd": ([_randn(B, Cs, H, W), _randn(B, Cs, H, W, seed=1)],
            lambda s, t: idd_ops.channel_wise_distillation_loss(s, t, reduction="none")),
    "cosine_slots": ([_randn(B, Cs, H, W), _randn(B, K, Cs, seed=1),
                      torch.ops.idd_ops._label_slots(_labels(B, 2 * H, 2 * W, K), H, W, K, 255)],
                     lambda x, c, s: torch.ops.idd_ops._pixel_centroid_cosine_slots(x, c, s, 1e-8)[0]),
    # 5 images: at pool 2 a chunk of 4 and one of 1 (the last chunk's tail adds the batch's mean)
    "skd": ([_randn(5, Cs, H, W), _randn(5, Ct, H, W, seed=1)], lambda s, t: idd_ops.structural_kd_loss(s, t)),
}
OPS = {name: _op(inputs, fn) for name, (inputs, fn) in CALLS.items()}
