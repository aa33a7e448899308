"""The benchmark cases. Each builds a closure for "fused" (idd_ops), "reference"
(idd_ops.reference), "compiled" (torch.compile of the reference) or "peer" (another library's
version, where a case has one), forward or forward+backward, and knows its roofline work
(benchmarks.roofline): the bytes its op must move at least (one read of every input, one write
of the student's gradient), the GEMM flops and the exps of its definition (METHOD.md).
"""
from . import common  # noqa: F401  (allocator setting first)

import math
import re

import torch

import idd_ops
from idd_ops import reference
from idd_ops._nearest import nearest_index

from .roofline import Work

POSITION_KINDS = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")
IMPLS = ("fused", "reference", "compiled", "peer")


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Case:
    """inputs[0] is the student tensor (the one that gets a gradient); call(module, *inputs)
    runs the op from `module` (idd_ops or idd_ops.reference) and returns a loss or an output
    tensor (forward+backward then backpropagates ones of its shape). flops = (forward, extra for the
    backward) GEMM flops at the rate of a bmm of gemm_shape; exps: exps of one pass. peer:
    (name, callable(*inputs), available). Cases whose reference is very slow set `rounds` to cap
    the timing rounds."""

    def __init__(self, name, desc, inputs, call, rounds=None, flops=(0, 0), gemm_shape=None, exps=0, peer=None):
        self.name, self.desc, self.inputs, self.call, self.rounds = name, desc, inputs, call, rounds
        self.flops, self.gemm_shape, self.exps, self.peer = flops, gemm_shape, exps, peer
        self.inputs[0].requires_grad_()

    def to(self, device):
        """The case with its inputs on `device` (built on the CPU, so seeds give the same data)."""
        self.inputs = [t.detach().to(device) for t in self.inputs]
        self.inputs[0].requires_grad_()
        return self

    def impls(self, compiled=True):
        """The implementations this case runs: fused, reference, compiled unless not asked,
        peer where the case has one and it is installed."""
        return ["fused", "reference"] + (["compiled"] if compiled else []) + \
            (["peer"] if self.peer and self.peer[2] else [])

    def build(self, impl, backward):
        """impl: one of IMPLS ("compiled" compiles on its first call)."""
        if impl == "compiled":
            if not hasattr(self, "_compiled"):
                self._compiled = compile_reference(self.call)
            loss_fn = self._compiled
        elif impl == "peer":
            loss_fn = self.peer[1]
        else:
            module = {"fused": idd_ops, "reference": reference}[impl]
            loss_fn = lambda *inputs: self.call(module, *inputs)  # noqa: E731
        student = self.inputs[0]
        seeds = {}  # the backward's seed, ones of the output's shape, made once: per call it would be a launch

        def run():
            student.grad = None
            out = loss_fn(*self.inputs)
            if backward:
                key = (out.shape, out.dtype)
                if key not in seeds:
                    seeds[key] = torch.ones(out.shape, dtype=out.dtype, device=out.device)
                out.backward(seeds[key])  # a non-scalar output (class_centroids) too, without a sum kernel
            return out
        return run

    def bytes_moved(self, backward):
        return _nbytes(*self.inputs) + (_nbytes(self.inputs[0]) if backward else 0)

    def work(self, backward):
        """The roofline work (benchmarks.roofline.Work) of one call."""
        flops = self.flops[0] + (self.flops[1] if backward else 0)
        return Work(self.bytes_moved(backward), flops, self.exps, self.gemm_shape if flops else None)


def compile_reference(call):
    """torch.compile of `call` with idd_ops.reference, shapes static. Dynamo caches compiled code
    per code object, and every case's closure shares one: later cases would meet its recompile
    limit (8) and fall back to compiling what the closure calls, and a second shape would turn
    dynamic shapes on. So each case starts from a reset and compiles alone; the on-disk inductor
    cache still serves a graph compiled before (report --warm-compile fills it)."""
    torch._dynamo.reset()
    return torch.compile(lambda *inputs: call(reference, *inputs), dynamic=False)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _shape_arg(arg):
    """"cityscapes", "cityscapes fragmented" or "cityscapes channels_last" -> (SHAPES tuple, labels
    kind, whether the features are channels_last, description)."""
    shape_name, *words = arg.split()
    last = "channels_last" in words
    labels = " ".join(w for w in words if w != "channels_last")
    shape = common.SHAPES[shape_name]
    desc = "B={} Cs={} Ct={} {}x{} labels {}x{} K={}".format(*shape)
    desc += (f", {labels} labels" if labels else "") + (", channels_last" if last else "")
    return shape, labels or "street", last, desc


def _idd(arg):
    shape, labels, last, desc = _shape_arg(arg)
    B, Cs, Ct = shape[:3]
    s, t, y, K = common.make_inputs(shape, labels=labels)
    if last:
        s, t = (f.contiguous(memory_format=torch.channels_last) for f in (s, t))
    # GEMMs: each network's centroid Gram (K x C x K per image) for the distance matrix; the
    # backward multiplies the student's K x K distance gradient into its centroids. In float64,
    # which the K x K math needs for nearly merged classes (METHOD.md 8)
    return Case(f"idd_loss {arg}", desc, [s, t, y], lambda m, s, t, y: m.inter_class_distance_loss(s, t, y, K),
                flops=(2 * B * K * K * (Cs + Ct), 2 * B * K * K * Cs), gemm_shape=(B, K, Ct, K, "float64"))


def scatter_mean_centroids(feats, labels, num_classes, ignore_index=255):
    """class_centroids' centroids through torch_scatter.scatter_mean (labels resized by nearest
    neighbour by index, ignored pixels sent to an extra slot that is dropped)."""
    import torch_scatter

    B, C, H, W = feats.shape
    y = labels.index_select(1, nearest_index(H, labels.shape[1], labels.device))
    y = y.index_select(2, nearest_index(W, labels.shape[2], labels.device)).reshape(B, 1, H * W)
    slot = torch.where(y == ignore_index, torch.full_like(y, num_classes), y).expand(B, C, H * W)
    means = torch_scatter.scatter_mean(feats.reshape(B, C, H * W), slot, dim=2, dim_size=num_classes + 1)
    return means[..., :num_classes].transpose(1, 2)


def torch_scatter_installed():
    try:
        import torch_scatter  # noqa: F401
    except Exception:  # ImportError, or a wheel built for another torch failing to load
        return False
    return True


def _class_centroids(arg):
    """class_centroids at the teacher's shape (the larger of IDD's two centroid passes)."""
    shape, labels, last, _ = _shape_arg(arg)
    B, _, Ct, H, W, Hy, Wy, K = shape
    _, t, y, K = common.make_inputs(shape, labels=labels)
    if last:
        t = t.contiguous(memory_format=torch.channels_last)
    desc = f"B={B} C={Ct} {H}x{W} labels {Hy}x{Wy} K={K}" + (f", {labels} labels" if labels != "street" else "") \
        + (", channels_last" if last else "")
    return Case(f"class_centroids {arg}", desc, [t, y], lambda m, f, y: m.class_centroids(f, y, K)[0],
                peer=("torch_scatter.scatter_mean", lambda f, y: scatter_mean_centroids(f, y, K),
                      torch_scatter_installed()))


def _position(size):
    H, W = size
    pred = torch.rand(8, len(POSITION_KINDS), H, W, generator=torch.Generator().manual_seed(0))
    return Case(f"position_loss {H}x{W}", f"B=8 M={len(POSITION_KINDS)} {H}x{W}", [pred],
                lambda m, p: m.position_encoding_loss(p, POSITION_KINDS))


def _batch(arg, default=8):
    """B from a trailing "b<N>" word of a case's argument ("pool2 b2" -> 2), else default."""
    last = arg.split()[-1] if arg else ""
    return int(last[1:]) if last.startswith("b") and last[1:].isdigit() else default


def _pixel_kd(B):
    y = common.street_labels(B, 512, 1024, 19)
    s, t = _randn(B, 19, 512, 1024), _randn(B, 19, 512, 1024, seed=1)
    return Case("pixel_kd" + (f" b{B}" if B != 8 else ""), f"logits B={B} K=19 512x1024, ignore 255", [s, t, y],
                lambda m, s, t, y: m.pixel_kd_loss(s, t, y, temperature=1.0), exps=s.numel() + t.numel())


def _cwd(B):
    s, t = _randn(B, 512, 64, 128), _randn(B, 512, 64, 128, seed=1)
    return Case("cwd" + (f" b{B}" if B != 8 else ""), f"B={B} C=512 64x128 T=4", [s, t],
                lambda m, s, t: m.channel_wise_distillation_loss(s, t, 4.0), exps=s.numel() + t.numel())


def _skd(pool, B):
    C, H, W = 512, 64, 128
    P = math.ceil(H / pool) * math.ceil(W / pool)
    # the reference forms [B, P, P] affinities: at pool 1 that is 8 x 8192^2 floats (2 GiB) each.
    # GEMMs (C x C Grams over the P pooled pixels, METHOD.md 7): F_S F_S^T, F_S F_T^T, F_T F_T^T
    # forward; G_SS F_S and G_ST F_T for the gradient
    return Case(f"skd pool{pool}" + (f" b{B}" if B != 8 else ""), f"B={B} C={C} {H}x{W} pool {pool}",
                [_randn(B, C, H, W), _randn(B, C, H, W, seed=1)],
                lambda m, s, t: m.structural_kd_loss(s, t, pool), rounds=2 if pool == 1 else None,
                flops=(3 * 2 * B * C * C * P, 2 * 2 * B * C * C * P), gemm_shape=(B, C, P, C))


def _ifvd(B):
    y = common.street_labels(B, 512, 1024, 19)
    return Case("ifvd" + (f" b{B}" if B != 8 else ""), f"B={B} Cs=512 Ct=2048 64x128 labels 512x1024 K=19",
                [_randn(B, 512, 64, 128), _randn(B, 2048, 64, 128, seed=1), y],
                lambda m, s, t, y: m.intra_class_variation_loss(s, t, y, 19))


NAME_FORMS = ("idd_loss|class_centroids SHAPE [fragmented] [channels_last]", "position_loss HxW",
              "skd poolN [bN]", "pixel_kd|cwd|ifvd [bN]")


def check_name(name):
    """Raises ValueError, naming the forms a case name takes, unless make() can build `name`
    (checked before any case is built, so a typo fails at once)."""
    op, _, arg = name.partition(" ")
    words = arg.split()
    batch = re.compile(r"b(?!8$)[1-9][0-9]*")  # b8 is the default, which a case's name leaves out
    if op in ("idd_loss", "class_centroids"):
        extras = words[1:]
        ok = bool(words) and words[0] in common.SHAPES and len(set(extras)) == len(extras) \
            and set(extras) <= {"fragmented", "channels_last"}
    elif op == "position_loss":
        ok = len(words) == 1 and re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", words[0]) is not None
    elif op == "skd":
        ok = len(words) in (1, 2) and re.fullmatch(r"pool[1-9][0-9]*", words[0]) is not None \
            and (len(words) == 1 or batch.fullmatch(words[1]) is not None)
    else:
        ok = op in ("pixel_kd", "cwd", "ifvd") and (not words or (len(words) == 1 and batch.fullmatch(words[0])))
    if not ok:
        raise ValueError(f"unknown benchmark case {name!r}: expected {'; '.join(NAME_FORMS)} "
                         f"(SHAPE one of {', '.join(common.SHAPES)}; bN other than the default b8), "
                         f"e.g. {', '.join(QUICK)}")


def make(name, device="cpu"):
    """A case by its name (see FULL, CUDA_FULL and QUICK), with its inputs on `device`."""
    check_name(name)
    return _make(name).to(device)


def _make(name):
    op, _, arg = name.partition(" ")
    if op == "idd_loss":
        return _idd(arg)
    if op == "class_centroids":
        return _class_centroids(arg)
    if op == "position_loss":
        return _position(tuple(int(v) for v in arg.split("x")))
    if op == "skd":
        return _skd(int(arg.split()[0].removeprefix("pool")), _batch(arg))
    builders = {"pixel_kd": _pixel_kd, "cwd": _cwd, "ifvd": _ifvd}
    if op in builders:
        return builders[op](_batch(arg))
    raise ValueError(f"unknown benchmark case {name!r}")


# Fragmented rows sit beside their street-layout rows: per-pixel random labels at feature
# resolution are the worst case for kernels that walk runs of equal labels.
FULL = ["idd_loss cityscapes", "idd_loss cityscapes fragmented", "idd_loss cityscapes channels_last", "idd_loss voc", "idd_loss ade20k",
        "idd_loss ade20k fragmented", "class_centroids cityscapes", "class_centroids cityscapes fragmented",
        "position_loss 64x128", "position_loss 512x1024", "pixel_kd", "cwd", "skd pool2", "skd pool1", "ifvd"]
# On a GPU the launch shape matters too: K = 1000 (many classes per block) and a small batch
# (B = 2, C = 256) that a grid of B x C/8 blocks would spread over only a few SMs.
CUDA_FULL = FULL + ["idd_loss k1000", "idd_loss b2-c256"]
QUICK = ["idd_loss cityscapes-small", "position_loss 512x1024"]
# The GPU guard's key rows (tools/gpu_check.sh, `report --guard`): the ops and passes that the
# targets of issues 21 and 22 name (benchmarks/targets.py), one case of each op first, so that a
# perf stage stopped at its time limit has measured every op (on 2026-11-30 the IDD and centroid
# variants came first and the limit cut pixel KD, CWD, SKD and the position loss); then the
# variants, and the small (B=2) shapes, where launches dominate. Only GUARD_COMPILE gets a
# torch.compile(reference) column there (about 6 s of compilation per case on an H200, less from
# the on-disk cache; same-shape rows share it).
GUARD = ["idd_loss cityscapes", "class_centroids cityscapes", "ifvd", "pixel_kd", "cwd", "skd pool2",
         "position_loss 512x1024", "idd_loss cityscapes fragmented", "class_centroids cityscapes fragmented",
         "idd_loss ade20k", "idd_loss k1000", "position_loss 64x128", "idd_loss cityscapes-small",
         "idd_loss b2-c256", "pixel_kd b2", "cwd b2", "skd pool2 b2", "ifvd b2"]
GUARD_COMPILE = ["idd_loss cityscapes", "class_centroids cityscapes", "ifvd", "pixel_kd", "cwd", "skd pool2",
                 "position_loss 512x1024", "idd_loss cityscapes fragmented", "class_centroids cityscapes fragmented",
                 "idd_loss ade20k", "idd_loss k1000"]
