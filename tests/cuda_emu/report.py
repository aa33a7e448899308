"""What each loss's CUDA path would ask of a GPU, predicted on the CPU: its launches and, from the
emulator's traffic model (memory_model.h), the bytes its kernels move, for each CUDA kernel set
(override.py's KERNEL_SETS).

    python -m tests.cuda_emu.report [--out benchmarks/TRAFFIC-emulated.md] [--cases idd_loss ...]

Each case runs forward+backward through the public API on CPU tensors with one kernel set's CUDA
kernels emulated (override.py), at a shape scaled down from the benchmarks' (B=2, a quarter of the
channels, 32x64 features, labels 256x512) so that the emulator runs it in seconds. Per call:
- launches: the library's emulated kernel launches, plus the ATen ops that move data on the way
  (the composite parts, allocations' fills; counted by the profiler: ATen ops that are not views
  or bare allocations and call none that moves data; in-place and out= ops count). On a GPU each
  is about one kernel launch. The names are the CPU's innermost ops (a CPU baddbmm_ shows as
  the copy_ it calls, a sum as its fill_), and a few are the CPU's alone: the host-side casts of
  wrapped Python scalars, and the conversion of int64 operands a CUDA kernel promotes in place.
- DRAM: the bytes of the distinct 32-byte sectors the library's kernels read and write (their
  DRAM traffic when every reuse hits in L2); sectors: the bytes of every 32-byte sector every
  warp request touched (the traffic through the SMs' L1 caches; repeated reads of a small table
  hit there). ATen ops are not in these.
- ideal: features and other dense inputs read once, label maps at the feature pixels the nearest
  resize keeps (one int64 each), the student's gradient written once.
- coalescing: distinct bytes the warps asked for over the sector bytes that served them.
- bank conflicts: shared-memory passes over the least the requests' bytes need; warp
  collectives: shuffles, votes and __syncwarp per warp.
Not predicted: time (latency, occupancy, the ATen ops' own traffic, launch overhead), which only a
GPU measures (tools/gpu_check.sh).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import idd_ops

from .build import source_revision
from .override import KERNEL_SETS, emulated_cuda
from .traffic import measured, total

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the benchmarks' inputs (run from anywhere, or from the tests)
    sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402
from benchmarks.cases import _nbytes, _randn  # noqa: E402
B, CS, CT, H, W, HY, WY, K = 2, 128, 512, 32, 64, 256, 512, 19
# ATen ops that move no data on a GPU: views, bare allocations, metadata.
NO_DATA = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::result_type",
           "aten::lift_fresh", "aten::set_", "aten::detach", "aten::is_nonzero", "aten::size", "aten::stride",
           "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::dim", "aten::numel", "aten::is_same_size",
           # in-place ops on metadata alone (their schemas mark the alias written, as a real write's do)
           "aten::detach_", "aten::as_strided_", "aten::squeeze_", "aten::unsqueeze_", "aten::transpose_", "aten::t_",
           "aten::swapdims_", "aten::swapaxes_", "aten::resize_as_"}


def _labels(kind):
    if kind == "fragmented":
        return common.fragmented_labels(B, H, W, HY, WY, K)
    return common.street_labels(B, HY, WY, K)


def _feature_labels_bytes(b=B, h=H, w=W):
    return b * h * w * 8


def case(name):
    """(inputs with the student first, call(*inputs) -> loss, ideal bytes of forward+backward)."""
    op, _, arg = name.partition(" ")
    if op in ("idd_loss", "ifvd"):
        s, t, y = _randn(B, CS, H, W), _randn(B, CT, H, W, seed=1), _labels(arg or "street")
        if "channels_last" in arg:
            s, t = (f.contiguous(memory_format=torch.channels_last) for f in (s, t))
        fn = idd_ops.inter_class_distance_loss if op == "idd_loss" else idd_ops.intra_class_variation_loss
        return [s, t, y], lambda s, t, y: fn(s, t, y, K), 2 * _nbytes(s) + _nbytes(t) + _feature_labels_bytes()
    if op == "class_centroids":
        t, y = _randn(B, CT, H, W), _labels(arg or "street")
        return [t, y], lambda t, y: idd_ops.class_centroids(t, y, K)[0].sum(), 2 * _nbytes(t) + _feature_labels_bytes()
    if op == "pixel_kd":
        s, t, y = _randn(B, K, 128, 256), _randn(B, K, 128, 256, seed=1), _labels("street")
        ideal = 3 * _nbytes(s) + _feature_labels_bytes(B, 128, 256)
        return [s, t, y], lambda s, t, y: idd_ops.pixel_kd_loss(s, t, y, temperature=1.0), ideal
    if op == "cwd":
        s, t = _randn(B, CS, H, W), _randn(B, CS, H, W, seed=1)
        return [s, t], lambda s, t: idd_ops.channel_wise_distillation_loss(s, t, 4.0), 3 * _nbytes(s)
    if op == "skd":
        s, t = _randn(B, CS, H, W), _randn(B, CS, H, W, seed=1)
        return [s, t], lambda s, t: idd_ops.structural_kd_loss(s, t, 2), 3 * _nbytes(s)
    if op == "position_loss":
        p = torch.rand(B, 5, 128, 256, generator=torch.Generator().manual_seed(0))
        kinds = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")
        return [p], lambda p: idd_ops.position_encoding_loss(p, kinds), 2 * _nbytes(p)
    raise ValueError(f"unknown case {name!r}")


CASES = ["idd_loss street", "idd_loss fragmented", "idd_loss channels_last", "class_centroids street",
         "class_centroids fragmented", "ifvd street", "ifvd fragmented", "pixel_kd", "cwd", "skd pool2",
         "position_loss"]


def _moves_data(name):
    if not name.startswith("aten::") or name in NO_DATA:
        return False
    try:
        packet = getattr(torch.ops.aten, name.removeprefix("aten::"))
    except AttributeError:
        return True
    returns = [getattr(packet, o)._schema.returns for o in packet.overloads()]
    tensors = [r[0] for r in returns if r and str(r[0].type) == "Tensor"]
    # a view returns an alias it does not write; an in-place or out= op writes the alias it returns
    return not tensors or not all(r.alias_info is not None and not r.alias_info.is_write for r in tensors)


def aten_ops(prof):
    """The ATen ops that move data and call none that does (an op's own work, about one GPU
    launch each), by name."""
    moves = {}

    def counts(e):  # whether e or an op below it moves data
        below = any([counts(c) for c in e.cpu_children])  # every child visited: a list, not a generator
        own = _moves_data(e.name)
        moves[e.id] = own and not below
        return below or own

    events = prof.events()
    for e in events:
        if e.cpu_parent is None:
            counts(e)
    names = {}
    for e in events:
        if moves.get(e.id):
            names[e.name] = names.get(e.name, 0) + 1
    return names


def measure(name, kernel_set):
    """One forward+backward of a case through one emulated kernel set: a dict of the figures."""
    inputs, call, ideal = case(name)
    inputs[0].requires_grad_()
    with emulated_cuda(kernel_set):
        seed = torch.ones(())  # made once, as benchmarks/cases.py does: no fill launch per call
        call(*inputs).backward(seed)  # warm-up: lazily built tables and caches
        inputs[0].grad = None
        t0 = time.perf_counter()
        with measured(torch.ops.idd_ops_emu) as launches, \
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call(*inputs).backward(seed)
        seconds = time.perf_counter() - t0
    aten = aten_ops(prof)
    return {"case": name, "set": kernel_set, "launches": launches, "aten": aten, "ideal": ideal, "seconds": seconds}


def _mb(n):
    return f"{n / 1e6:.2f}"


def _cells(l):
    """DRAM MB, sector MB, coalescing, float atomics, shared atomics, bank conflicts, warp collectives
    of a launch (or a total); dashes where no kernel of the library ran."""
    if not l.dram_bytes:
        return ["-"] * 7
    wave = f"{l.bank_conflicts:.2f}" if l.sh_requests else "-"
    return [_mb(l.dram_bytes), _mb(l.sector_bytes), f"{l.coalescing:.2f}", str(l.float_atomics), str(l.sh_atomics), wave,
            str(l.collectives)]


def summary_row(m):
    t = total(m["launches"])
    dram, l2, *rest = _cells(t)
    ratio = f"{m['ideal'] / t.dram_bytes:.2f}" if t.dram_bytes else "-"
    cells = [m["case"], m["set"], f"{len(m['launches'])} + {sum(m['aten'].values())}", dram, l2, _mb(m["ideal"]), ratio,
             *rest]
    return "| " + " | ".join(cells) + " |"


def kernel_rows(m):
    return ["| " + " | ".join([m["case"], m["set"], f"`{l.site}`", f"{l.blocks} x {l.threads}", *_cells(l)]) + " |"
            for l in m["launches"]]


def markdown(results, commit):
    lines = [
        "# Predicted GPU memory traffic (CUDA emulator)",
        "",
        f"Generated by `python -m tests.cuda_emu.report` at {commit} on the CPU: no GPU ran this. Each "
        f"case is one forward+backward at B={B}, student {CS} / teacher {CT} channels at {H}x{W}, labels "
        f"{HY}x{WY}, K={K} (pixel KD and the position loss: {B}x{K} / {B}x5 maps of 128x256); see the "
        "module's docstring for what each column counts.",
        "",
        "- launches: emulated kernel launches + ATen ops that move data (each about one GPU launch).",
        "- DRAM: MB of the distinct 32-byte sectors the library's kernels read and write; sectors: MB of every"
        " 32-byte sector of every warp request (the traffic through L1, where repeated reads of a small table hit).",
        "- ideal/DRAM above 1: the kernels read less than the ideal counts (it has no ATen traffic);"
        " dashes: no kernel of the library ran.",
        "- bank conflicts: shared-memory passes over the least the requests' bytes need (1: none).",
        "- warp collectives: shuffles, votes and `__syncwarp` per warp (warp-synchronous work, e.g. a"
        " warp's loop over the classes its lanes hold).",
        "",
        "| case | set | launches | DRAM MB | sector MB | ideal MB | ideal/DRAM | coalescing | float atomics (global) "
        "| shared atomics | bank conflicts | warp collectives |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(summary_row(m) for m in results),
        "",
        "## Per kernel launch",
        "",
        "| case | set | launch | grid x block | DRAM MB | sector MB | coalescing | float atomics | shared atomics "
        "| bank conflicts | warp collectives |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *(row for m in results for row in kernel_rows(m)),
        "",
        "## ATen ops per call",
        "",
        "| case | set | ops |",
        "|---|---|---|",
        *(f"| {m['case']} | {m['set']} | " + ", ".join(f"{n.removeprefix('aten::')} {c}" for n, c in
                                                      sorted(m["aten"].items())) + " |" for m in results),
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "TRAFFIC-emulated.md"))
    p.add_argument("--cases", nargs="+", default=CASES, metavar="CASE", help=f"default: {' / '.join(CASES)}")
    args = p.parse_args(argv)
    commit = source_revision("csrc", "idd_ops", "tests/cuda_emu")
    results = []
    for i, name in enumerate(args.cases):
        for kernel_set in KERNEL_SETS:
            results.append(measure(name, kernel_set))
            print(f"[{len(results)}/{len(args.cases) * len(KERNEL_SETS)}] {name} ({kernel_set}): "
                  f"{results[-1]['seconds']:.1f} s emulated", flush=True)
    Path(args.out).write_text(markdown(results, commit))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
