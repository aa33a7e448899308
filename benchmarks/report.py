"""Fused vs reference report for the IDD loss: time, speed-up, peak memory, and the fraction of
the memory-bandwidth bound reached. Prints a markdown table and writes it to --out.

    python -m benchmarks.report            # Cityscapes shape, B=8 (a few minutes on 2 cores)
    python -m benchmarks.report --quick    # B=2, fewer repeats (about a minute)
"""
import argparse
import platform
import sys

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
import torch

import idd_ops
from idd_ops import reference


def bytes_moved(s, t, backward):
    """What the op must touch at least: one read of each feature map, one write of the
    student's gradient in the backward."""
    n = s.numel() * s.element_size() + t.numel() * t.element_size()
    return n + (s.numel() * s.element_size() if backward else 0)


def run(shape_name, device, repeat, progress):
    shape = common.SHAPES[shape_name]
    s, t, y, K = common.make_inputs(shape, device)
    s.requires_grad_()
    bw = common.copy_bandwidth_gbs(s.numel() * 4, device)
    rows = []
    for backward in (False, True):
        mode = "forward+backward" if backward else "forward"
        res = {}
        for name, impl in (("fused", idd_ops.inter_class_distance_loss), ("reference", reference.inter_class_distance_loss)):
            progress(f"{shape_name} {mode} {name}")
            fn = common.loss_fn(impl, s, t, y, K, backward)
            mem = peak.measure(name, shape_name, backward) if device == "cpu" else common.peak_memory_bytes(fn, device)
            res[name] = (common.time_ms(fn, device, repeat=repeat), mem)
        bound_ms = bytes_moved(s, t, backward) / (bw * 1e6)
        rows.append(dict(shape=shape_name, mode=mode, fused_ms=res["fused"][0], ref_ms=res["reference"][0],
                         fused_mb=res["fused"][1] / 2**20, ref_mb=res["reference"][1] / 2**20, bound_ms=bound_ms,
                         bw=bw))
    return rows


def table(rows):
    head = ("| shape | pass | fused ms | reference ms | speed-up | fused peak MiB | reference peak MiB | "
            "memory ratio | bound ms | fused / bound |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['shape']} | {r['mode']} | {r['fused_ms']:.1f} | {r['ref_ms']:.1f} | {r['ref_ms'] / r['fused_ms']:.1f}x | "
        f"{r['fused_mb']:.0f} | {r['ref_mb']:.0f} | {r['ref_mb'] / max(r['fused_mb'], 1e-3):.1f}x | "
        f"{r['bound_ms']:.1f} | {r['fused_ms'] / r['bound_ms']:.2f} |\n" for r in rows)
    return head + body


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=2 and 3 repeats instead of B=8 and 7")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = p.parse_args(argv)
    shape = "cityscapes-small" if args.quick else "cityscapes"
    repeat = 3 if args.quick else 7
    steps = [0]

    def progress(msg):
        steps[0] += 1
        print(f"[{steps[0]}/4] {msg}", file=sys.stderr, flush=True)

    rows = run(shape, args.device, repeat, progress)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    meta = (f"IDD loss (euclidean, reduction=mean), B,Cs,Ct,H,W,Hy,Wy,K = {common.SHAPES[shape]}, float32, "
            f"street-layout labels. Device: {args.device} ({dev}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, THP_MEM_ALLOC_ENABLE={common.os.environ.get('THP_MEM_ALLOC_ENABLE')}. "
            f"Copy bandwidth {rows[0]['bw']:.1f} GB/s (read + write); bound = bytes the op must move / that "
            f"bandwidth. Times are medians of {repeat}.\n\n")
    text = meta + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python -m benchmarks.report{' --quick' if args.quick else ''}`\n\n" + text)


if __name__ == "__main__":
    main()
