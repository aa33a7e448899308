"""Scaling sweeps of the IDD loss (forward+backward): time and peak memory against H*W, C, K and
B, fused beside the reference, on log-log PNG plots and a markdown table. Needs matplotlib.

    python -m benchmarks.sweep             # writes results/bench-<date-time>/sweep/ (7.6 min on 2 busy CPU cores)
    python -m benchmarks.sweep --update    # replaces the committed benchmarks/sweep/
"""
import argparse
import os
import sys
import time

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
from . import cli
import torch

import idd_ops
from idd_ops import reference
from idd_ops.demo.plots import pyplot, require_matplotlib

SWEEP_EXPECTED = "about 8 min on 2 CPU cores (7.6 min measured at load 7-8)"
BASE = dict(B=4, C=256, H=64, W=128, K=19)  # teacher C = 2 * C, labels at 8x the feature size
SWEEPS = {
    "pixels": ("H*W", [dict(H=h, W=2 * h) for h in (16, 32, 64, 128)], lambda p: p["H"] * p["W"]),
    "channels": ("C", [dict(C=c) for c in (64, 128, 256, 512)], lambda p: p["C"]),
    "classes": ("K", [dict(K=k) for k in (8, 19, 64, 150)], lambda p: p["K"]),
    "batch": ("B", [dict(B=b) for b in (1, 2, 4, 8)], lambda p: p["B"]),
}


def shape_of(params):
    p = dict(BASE, **params)
    return (p["B"], p["C"], 2 * p["C"], p["H"], p["W"], 8 * p["H"], 8 * p["W"], p["K"]), p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="folder for sweep.md and the PNG plots (default: results/bench-<date-time>/sweep, a new folder)")
    ap.add_argument("--update", action="store_true", help="write the committed benchmarks/sweep/ instead")
    ap.add_argument("--repeat", type=cli.positive_int, default=3, help="timing rounds, the median taken (default 3)")
    common.add_allocator_option(ap)
    args = ap.parse_args(argv)
    allocator = common.apply_allocator_option(args)
    if args.update and args.out:
        ap.error("--update writes benchmarks/sweep/; leave out --out")
    args.out = "benchmarks/sweep" if args.update else args.out or os.path.join(
        "results", time.strftime("bench-%Y%m%d-%H%M%S"), "sweep")
    cli.make_out(ap, args.out)
    require_matplotlib(ap, "benchmarks.sweep")
    print(f"benchmarks.sweep: {SWEEP_EXPECTED}; writing {args.out}/", file=sys.stderr, flush=True)

    plt = pyplot()

    lines = [f"IDD loss forward+backward, fused vs reference; base {BASE} (teacher C = 2C, labels 8x the "
             f"features), torch {torch.__version__}, {torch.get_num_threads()} threads; times: the median of "
             f"{args.repeat} alternating rounds (benchmarks/RESULTS.md takes the best); allocator: {allocator}. "
             f"Command: `{cli.command_line('benchmarks.sweep', argv)}`\n",
             "| sweep | value | fused ms | reference ms | speed-up | fused MiB | reference MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    total = sum(len(v[1]) for v in SWEEPS.values())
    step, start = 0, time.perf_counter()
    for sweep, (label, points, x_of) in SWEEPS.items():
        xs, res = [], {"fused": ([], []), "reference": ([], [])}
        for params in points:
            shape, p = shape_of(params)
            elapsed = time.perf_counter() - start
            left = f", about {elapsed / step * (total - step) / 60:.1f} min left" if step else ""
            step += 1
            print(f"[{step}/{total}] {sweep} {label}={x_of(p)} ({elapsed / 60:.1f} min so far{left})",
                  file=sys.stderr, flush=True)
            s, t, y, K = common.make_inputs(shape)
            s.requires_grad_()
            fns = [common.loss_fn(f, s, t, y, K, True)
                   for f in (idd_ops.inter_class_distance_loss, reference.inter_class_distance_loss)]
            times = common.time_interleaved(fns, repeat=args.repeat, settle_s=0.2)
            mems = []
            for fn in fns:
                s.grad = None  # freed before the measured call (benchmarks.peak)
                mems.append(peak.measure(fn, held=lambda: [s.grad])[0] / 2**20)
            xs.append(x_of(p))
            for impl, tm, mb in zip(("fused", "reference"), times, mems):
                res[impl][0].append(tm)
                res[impl][1].append(mb)
            lines.append(f"| {sweep} | {x_of(p)} | {times[0]:.1f} | {times[1]:.1f} | {times[1] / times[0]:.1f}x | "
                         f"{mems[0]:.0f} | {mems[1]:.0f} |")
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for impl, style in (("fused", "o-"), ("reference", "s--")):
            axes[0].loglog(xs, res[impl][0], style, label=impl)
            axes[1].loglog(xs, [max(m, 0.1) for m in res[impl][1]], style, label=impl)
        for ax, ylab in zip(axes, ("time per forward+backward (ms)", "peak extra memory (MiB)")):
            ax.set_xlabel(label)
            ax.set_ylabel(ylab)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"IDD loss scaling with {label}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"sweep_{sweep}.png"), dpi=100)
        plt.close(fig)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
