"""The benchmark cases: each builds a closure for "fused" or "reference", forward or
forward+backward, and knows the bytes its op must move at least (for the bandwidth bound).

A case is rebuilt by name in a fresh process for peak-memory measurements (benchmarks.peak)."""
from . import common  # noqa: F401  (allocator setting first)

import torch

import idd_ops
from idd_ops import reference

POSITION_KINDS = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class IDDLoss:
    """inter_class_distance_loss at a SHAPES entry."""

    def __init__(self, shape_name, device="cpu"):
        self.shape = common.SHAPES[shape_name]
        self.name = f"idd_loss {shape_name}"
        self.desc = "B={} Cs={} Ct={} {}x{} labels {}x{} K={}".format(*self.shape)
        self.s, self.t, self.y, self.K = common.make_inputs(self.shape, device)
        self.s.requires_grad_()

    def build(self, impl, backward):
        fn = {"fused": idd_ops.inter_class_distance_loss, "reference": reference.inter_class_distance_loss}[impl]
        return common.loss_fn(fn, self.s, self.t, self.y, self.K, backward)

    def bytes_moved(self, backward):
        # one read of each feature map, one write of the student's gradient
        return _nbytes(self.s, self.t) + (_nbytes(self.s) if backward else 0)


class PositionLoss:
    """position_encoding_loss on a [B, M, H, W] prediction, M = 5 maps."""

    def __init__(self, size, device="cpu", batch=8):
        H, W = size
        self.name = f"position_loss {H}x{W}"
        self.desc = f"B={batch} M={len(POSITION_KINDS)} {H}x{W}"
        self.pred = torch.rand(batch, len(POSITION_KINDS), H, W, device=device, requires_grad=True)

    def build(self, impl, backward):
        fn = {"fused": idd_ops.position_encoding_loss, "reference": reference.position_encoding_loss}[impl]

        def run():
            self.pred.grad = None
            loss = fn(self.pred, POSITION_KINDS)
            if backward:
                loss.backward()
            return loss
        return run

    def bytes_moved(self, backward):
        return _nbytes(self.pred) * (2 if backward else 1)


def make(name, device="cpu"):
    """A case by its name: 'idd_loss <shape>' or 'position_loss <H>x<W>'."""
    op, arg = name.split(" ", 1)
    if op == "idd_loss":
        return IDDLoss(arg, device)
    if op == "position_loss":
        return PositionLoss(tuple(int(v) for v in arg.split("x")), device)
    raise ValueError(f"unknown benchmark case {name!r}")


FULL = ["idd_loss cityscapes", "position_loss 64x128", "position_loss 512x1024"]
QUICK = ["idd_loss cityscapes-small", "position_loss 64x128", "position_loss 512x1024"]
