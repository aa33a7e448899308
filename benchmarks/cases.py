"""The benchmark cases. Each builds a closure for "fused" (idd_ops) or "reference"
(idd_ops.reference), forward or forward+backward, and knows the bytes its op must move at
least (for the bandwidth bound): one read of every input, one write of the student's gradient.

A case is rebuilt by name in a fresh process for peak-memory measurements (benchmarks.peak)."""
from . import common  # noqa: F401  (allocator setting first)

import torch

import idd_ops
from idd_ops import reference

POSITION_KINDS = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Case:
    """inputs[0] is the student tensor (the one that gets a gradient); call(module, *inputs)
    runs the loss from `module` (idd_ops or idd_ops.reference). Cases whose reference is very
    slow set `rounds` to cap the timing rounds."""

    def __init__(self, name, desc, inputs, call, rounds=None):
        self.name, self.desc, self.inputs, self.call, self.rounds = name, desc, inputs, call, rounds
        self.inputs[0].requires_grad_()

    def to(self, device):
        """The case with its inputs on `device` (built on the CPU, so seeds give the same data)."""
        self.inputs = [t.detach().to(device) for t in self.inputs]
        self.inputs[0].requires_grad_()
        return self

    def build(self, impl, backward):
        """impl: "fused", "reference", or "compiled" (torch.compile of the reference; compiles
        on its first call)."""
        if impl == "compiled":
            if not hasattr(self, "_compiled"):
                self._compiled = torch.compile(lambda *inputs: self.call(reference, *inputs))
            loss_fn = self._compiled
        else:
            module = {"fused": idd_ops, "reference": reference}[impl]
            loss_fn = lambda *inputs: self.call(module, *inputs)  # noqa: E731
        student = self.inputs[0]

        def run():
            student.grad = None
            loss = loss_fn(*self.inputs)
            if backward:
                loss.backward()
            return loss
        return run

    def bytes_moved(self, backward):
        return _nbytes(*self.inputs) + (_nbytes(self.inputs[0]) if backward else 0)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _idd(shape_name):
    s, t, y, K = common.make_inputs(common.SHAPES[shape_name])
    return Case(f"idd_loss {shape_name}", "B={} Cs={} Ct={} {}x{} labels {}x{} K={}".format(*common.SHAPES[shape_name]),
                [s, t, y], lambda m, s, t, y: m.inter_class_distance_loss(s, t, y, K))


def _position(size):
    H, W = size
    pred = torch.rand(8, len(POSITION_KINDS), H, W, generator=torch.Generator().manual_seed(0))
    return Case(f"position_loss {H}x{W}", f"B=8 M={len(POSITION_KINDS)} {H}x{W}", [pred],
                lambda m, p: m.position_encoding_loss(p, POSITION_KINDS))


def _pixel_kd():
    y = common.street_labels(8, 512, 1024, 19)
    return Case("pixel_kd", "logits B=8 K=19 512x1024, ignore 255", [_randn(8, 19, 512, 1024), _randn(8, 19, 512, 1024, seed=1), y],
                lambda m, s, t, y: m.pixel_kd_loss(s, t, y, temperature=1.0))


def _cwd():
    return Case("cwd", "B=8 C=512 64x128 T=4", [_randn(8, 512, 64, 128), _randn(8, 512, 64, 128, seed=1)],
                lambda m, s, t: m.channel_wise_distillation_loss(s, t, 4.0))


def _skd(pool):
    # the reference forms [B, P, P] affinities: at pool 1 that is 8 x 8192^2 floats (2 GiB) each
    return Case(f"skd pool{pool}", f"B=8 C=512 64x128 pool {pool}", [_randn(8, 512, 64, 128), _randn(8, 512, 64, 128, seed=1)],
                lambda m, s, t: m.structural_kd_loss(s, t, pool), rounds=2 if pool == 1 else None)


def _ifvd():
    y = common.street_labels(8, 512, 1024, 19)
    return Case("ifvd", "B=8 Cs=512 Ct=2048 64x128 labels 512x1024 K=19",
                [_randn(8, 512, 64, 128), _randn(8, 2048, 64, 128, seed=1), y],
                lambda m, s, t, y: m.intra_class_variation_loss(s, t, y, 19))


def make(name, device="cpu"):
    """A case by its name (see FULL, CUDA_FULL and QUICK), with its inputs on `device`."""
    return _make(name).to(device)


def _make(name):
    op, _, arg = name.partition(" ")
    if op == "idd_loss":
        return _idd(arg)
    if op == "position_loss":
        return _position(tuple(int(v) for v in arg.split("x")))
    if op == "skd":
        return _skd(int(arg.removeprefix("pool")))
    builders = {"pixel_kd": _pixel_kd, "cwd": _cwd, "ifvd": _ifvd}
    if op in builders:
        return builders[op]()
    raise ValueError(f"unknown benchmark case {name!r}")


FULL = ["idd_loss cityscapes", "idd_loss voc", "idd_loss ade20k", "position_loss 64x128", "position_loss 512x1024", "pixel_kd", "cwd", "skd pool2",
        "skd pool1", "ifvd"]
# On a GPU the launch shape matters too: K = 1000 (many classes per block) and a small batch
# (B = 2, C = 256) that a grid of B x C/8 blocks would spread over only a few SMs.
CUDA_FULL = FULL + ["idd_loss k1000", "idd_loss b2-c256"]
QUICK = ["idd_loss cityscapes-small", "position_loss 512x1024"]
