"""Fused vs reference report: time, speed-up, peak memory, and the fraction of the
memory-bandwidth bound reached, for every case of benchmarks/cases.py. Prints a markdown
table and writes it to a new folder, results/bench-<date-time>/RESULTS.md, unless --out names
a file or --update replaces the committed benchmarks/RESULTS.md.

    python -m benchmarks.report            # every op at B=8 Cityscapes shapes (tens of minutes)
    python -m benchmarks.report --quick    # IDD at B=2 and the position loss, 3 rounds (1 min)
    python -m benchmarks.report --update   # every op, written to benchmarks/RESULTS.md

Times are measured on 2 CPU cores; each entry prints its progress and the time left.
"""
import argparse
import os
import platform
import sys
import time

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
from . import cases
import torch

MODES = (False, True)
EXPECTED = {"full": "tens of minutes on 2 CPU cores (not timed end to end; the time left is printed after every entry)",
            "quick": "about 1 min on 2 CPU cores (measured)"}


def measure(case_names, device, repeat, compiled):
    impls = ["fused", "reference"] + (["compiled"] if compiled else [])
    rows, total, step = [], len(case_names) * len(MODES), 0
    bw = common.copy_bandwidth_gbs(2**28, device)
    start = time.perf_counter()
    for name in case_names:
        case = cases.make(name, device)
        for backward in MODES:
            mode = "forward+backward" if backward else "forward"
            elapsed = time.perf_counter() - start
            left = f", about {elapsed / step * (total - step) / 60:.1f} min left" if step else ""
            step += 1
            print(f"[{step}/{total}] {name} {mode} ({elapsed / 60:.1f} min so far{left})", file=sys.stderr, flush=True)
            times = common.time_interleaved([case.build(impl, backward) for impl in impls], device,
                                            repeat=min(repeat, case.rounds or repeat))
            if device == "cpu":
                mem = [peak.measure(name, impl, backward) for impl in impls]
            else:
                mem = [common.peak_memory_bytes(case.build(impl, backward), device) for impl in impls]
            row = dict(case=name, desc=case.desc, mode=mode, bound_ms=case.bytes_moved(backward) / (bw * 1e6))
            for impl, t, m in zip(impls, times, mem):
                row[impl + "_ms"], row[impl + "_mb"] = t, m / 2**20
            rows.append(row)
        del case
    return rows, bw


def _ratio(num, den):
    return f"{num / den:.1f}x" if den > 0 else "-"


def table(rows):
    compiled = "compiled_ms" in rows[0]
    head = ["op", "shape", "pass", "fused ms", "reference ms"] + (["compiled ms"] if compiled else []) + \
        ["speed-up vs reference"] + (["vs compiled"] if compiled else []) + \
        ["fused peak MiB", "reference peak MiB"] + (["compiled peak MiB"] if compiled else []) + \
        ["memory: reference / fused", "bound ms", "fused / bound"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [r["case"].split()[0], r["desc"], r["mode"], f"{r['fused_ms']:.1f}", f"{r['reference_ms']:.1f}"]
        cells += [f"{r['compiled_ms']:.1f}"] if compiled else []
        cells += [_ratio(r["reference_ms"], r["fused_ms"])] + ([_ratio(r["compiled_ms"], r["fused_ms"])] if compiled else [])
        cells += [f"{r['fused_mb']:.0f}", f"{r['reference_mb']:.0f}"] + ([f"{r['compiled_mb']:.0f}"] if compiled else [])
        cells += [_ratio(r["reference_mb"], max(r["fused_mb"], 1.0)), f"{r['bound_ms']:.1f}",
                  f"{r['fused_ms'] / r['bound_ms']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two cases and 3 rounds instead of all cases and 7")
    p.add_argument("--cases", nargs="+", default=None, help="case names to run (default: all, or the quick set)")
    p.add_argument("--skip", nargs="+", default=(), help="case names to leave out")
    p.add_argument("--repeat", type=int, default=None, help="timing rounds (default 7, --quick 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None,
                   help="markdown file to write (default: results/bench-<date-time>/RESULTS.md, a new folder)")
    p.add_argument("--update", action="store_true",
                   help="write the committed benchmarks/RESULTS.md (RESULTS-cuda.md with --device cuda) instead")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    committed = "benchmarks/RESULTS-cuda.md" if on_cuda else "benchmarks/RESULTS.md"
    if args.update and args.out:
        p.error(f"--update writes {committed}; leave out --out")
    args.out = committed if args.update else args.out or os.path.join(
        "results", time.strftime("bench-%Y%m%d-%H%M%S"), os.path.basename(committed))
    expected = "" if args.cases else EXPECTED["quick" if args.quick else "full"] + "; "
    print(f"benchmarks.report: {expected}writing {args.out}", file=sys.stderr, flush=True)
    repeat = args.repeat or (3 if args.quick else 7)
    compiled = not (args.no_compile or args.quick)
    default_cases = cases.QUICK if args.quick else (cases.CUDA_FULL if on_cuda else cases.FULL)
    names = [c for c in (args.cases or default_cases) if c not in args.skip]
    rows, bw = measure(names, args.device, repeat, compiled)
    if on_cuda:
        dev = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        dev = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    meta = (f"Device: {args.device} ({dev}), torch {torch.__version__}, "
            f"THP_MEM_ALLOC_ENABLE={common.os.environ.get('THP_MEM_ALLOC_ENABLE')}, float32. IDD: euclidean, "
            f"reduction=mean, street-layout labels. Position loss: maps {', '.join(cases.POSITION_KINDS)}.\n"
            f"Times: medians of {repeat} rounds (2 for SKD pool 1), implementations alternating"
            f"{'; compiled = torch.compile(reference), timed after its compilation' if compiled else ''}. "
            f"Peak memory: growth of the peak resident set in a fresh process (CPU; compiled: on its second "
            f"call) or max_memory_allocated (CUDA). Memory ratios floor the fused peak at 1 MiB. Bound: bytes the op "
            f"must move / copy bandwidth measured in the same run ({bw:.1f} GB/s, read + write).\n\n")
    text = meta + table(rows)
    print(text)
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"Command: `python -m benchmarks.report {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                + text)
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
