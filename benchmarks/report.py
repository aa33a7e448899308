"""Fused vs reference report: time, speed-up, peak memory, and the fraction of the
memory-bandwidth bound reached, for every case of benchmarks/cases.py. Prints a markdown
table and writes it to --out.

    python -m benchmarks.report            # every op at B=8 Cityscapes shapes (several minutes)
    python -m benchmarks.report --quick    # IDD at B=2 and the position loss, 3 rounds (< 1 minute)
"""
import argparse
import platform
import sys

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
from . import cases
import torch

MODES = (False, True)


def measure(case_names, device, repeat):
    rows, total, step = [], len(case_names) * len(MODES), 0
    bw = None
    for name in case_names:
        case = cases.make(name, device)
        if bw is None:
            bw = common.copy_bandwidth_gbs(2**28, device)
        for backward in MODES:
            step += 1
            mode = "forward+backward" if backward else "forward"
            print(f"[{step}/{total}] {name} {mode}", file=sys.stderr, flush=True)
            fused_ms, ref_ms = common.time_interleaved(
                [case.build("fused", backward), case.build("reference", backward)], device,
                repeat=min(repeat, case.rounds or repeat))
            if device == "cpu":
                mem = [peak.measure(name, impl, backward) for impl in ("fused", "reference")]
            else:
                mem = [common.peak_memory_bytes(case.build(impl, backward), device) for impl in ("fused", "reference")]
            rows.append(dict(case=name, desc=case.desc, mode=mode, fused_ms=fused_ms, ref_ms=ref_ms,
                             fused_mb=mem[0] / 2**20, ref_mb=mem[1] / 2**20,
                             bound_ms=case.bytes_moved(backward) / (bw * 1e6)))
        del case
    return rows, bw


def table(rows):
    out = ["| op | shape | pass | fused ms | reference ms | speed-up | fused peak MiB | reference peak MiB | "
           "memory saved | bound ms | fused / bound |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        saved = f"{r['ref_mb'] / r['fused_mb']:.1f}x" if r["fused_mb"] >= 1 else f"{r['ref_mb']:.0f} MiB"
        out.append(f"| {r['case'].split()[0]} | {r['desc']} | {r['mode']} | {r['fused_ms']:.1f} | {r['ref_ms']:.1f} | "
                   f"{r['ref_ms'] / r['fused_ms']:.1f}x | {r['fused_mb']:.0f} | {r['ref_mb']:.0f} | {saved} | "
                   f"{r['bound_ms']:.1f} | {r['fused_ms'] / r['bound_ms']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two cases and 3 rounds instead of all cases and 7")
    p.add_argument("--cases", nargs="+", default=None, help="case names to run (default: all, or the quick set)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = p.parse_args(argv)
    repeat = 3 if args.quick else 7
    rows, bw = measure(args.cases or (cases.QUICK if args.quick else cases.FULL), args.device, repeat)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    meta = (f"Device: {args.device} ({dev}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"THP_MEM_ALLOC_ENABLE={common.os.environ.get('THP_MEM_ALLOC_ENABLE')}, float32. IDD: euclidean, "
            f"reduction=mean, street-layout labels. Position loss: maps {', '.join(cases.POSITION_KINDS)}.\n"
            f"Times: medians of {repeat} rounds, fused and reference alternating. Peak memory: growth of the "
            f"peak resident set in a fresh process (CPU) or max_memory_allocated (CUDA). Bound: bytes the op "
            f"must move / copy bandwidth measured in the same run ({bw:.1f} GB/s, read + write).\n\n")
    text = meta + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python -m benchmarks.report{' --quick' if args.quick else ''}`\n\n" + text)


if __name__ == "__main__":
    main()
