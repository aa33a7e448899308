"""Fused vs reference report: time, speed-up, peak memory and the roofline bound (with the
resource that binds it) for every case of benchmarks/cases.py. Prints a markdown table and
writes it to a new folder, results/bench-<date-time>/RESULTS.md, unless --out names a file or
--update replaces the committed benchmarks/RESULTS.md (RESULTS-cuda.md with --device cuda).

    python -m benchmarks.report            # every op at B=8 Cityscapes shapes (tens of minutes)
    python -m benchmarks.report --quick    # IDD at B=2 and the position loss, 3 rounds (1 min)
    python -m benchmarks.report --update   # every op, written to benchmarks/RESULTS.md

The training-step view is a separate script and file: python -m benchmarks.train_step.
Each entry prints its progress and the time left. Exits with status 1 (after writing the table)
if a peak-memory entry is below the bytes its call returns, which no correct measurement gives.
"""
import argparse
import os
import platform
import sys
import time

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
from . import cases, roofline
import torch

MODES = (False, True)
PEAK_ATTEMPTS = 3  # measurements of a peak that comes out below the returned bytes
EXPECTED = {"full": "tens of minutes on 2 CPU cores (not timed end to end; the time left is printed after every entry)",
            "quick": "about 1 min on 2 CPU cores (measured)"}
TRAIN_STEP = {"cpu": "benchmarks/TRAIN_STEP.md", "cuda": "benchmarks/TRAIN_STEP-cuda.md"}


def measure_row(case, backward, device, repeat, compiled, rates, probe):
    """One table row: times (alternating, with the copy probe), peaks (profiler), bound, for
    case and pass."""
    impls = case.impls(compiled)
    *times, probe_ms = common.time_interleaved([case.build(impl, backward) for impl in impls] + [probe], device,
                                               repeat=min(repeat, case.rounds or repeat), stat=min)
    student = case.inputs[0]
    row = dict(case=case.name, desc=case.desc, mode="forward+backward" if backward else "forward")
    row["copy_gbs"] = probe.rate(probe_ms) / 1e9
    row["bound_ms"], row["bound_by"] = rates.bound(case.work(backward), row["copy_gbs"] * 1e9)
    for impl, t in zip(impls, times):
        run = case.build(impl, backward)
        row[impl + "_peak"], row[impl + "_returned"] = peak.measure(
            run, device, held=lambda: [student.grad] if backward else [], attempts=PEAK_ATTEMPTS,
            before=lambda: setattr(student, "grad", None))  # the previous call's gradient, freed
        row[impl + "_ms"] = t
    row["returned"] = min(row[impl + "_returned"] for impl in impls)
    if case.peer:
        row["peer_name"] = case.peer[0]
    return row


def measure(case_names, device, repeat, compiled):
    rates, probe = roofline.Rates(device), common.CopyProbe(device)
    rows, total, step = [], len(case_names) * len(MODES), 0
    start = time.perf_counter()
    for name in case_names:
        case = cases.make(name, device)
        for backward in MODES:
            mode = "forward+backward" if backward else "forward"
            elapsed = time.perf_counter() - start
            left = f", about {elapsed / step * (total - step) / 60:.1f} min left" if step else ""
            step += 1
            print(f"[{step}/{total}] {name} {mode} ({elapsed / 60:.1f} min so far{left})", file=sys.stderr, flush=True)
            rows.append(measure_row(case, backward, device, repeat, compiled, rates, probe))
        del case
    return rows, rates


def _ratio(num, den):
    return f"{num / den:.1f}x" if num is not None and den else "-"


def _mib(row, impl):
    """Peak in MiB, marked '!' where it is below the bytes the call returns."""
    b = row.get(impl + "_peak")
    if b is None:
        return "-"
    return _mib_text(b) + (" !" if b < row[impl + "_returned"] else "")


def _mib_text(b):
    """MiB with one decimal under 10 MiB (outputs of a few hundred KiB stay visible)."""
    return f"{b / 2**20:.1f}" if b < 10 * 2**20 else f"{b / 2**20:.0f}"


def _peer_cell(row, key, fmt):
    if "peer_name" not in row:
        return "-"
    return fmt(row[key]) if key in row else "not installed"


def table(rows):
    compiled = any("compiled_ms" in r for r in rows)
    peers = sorted({r["peer_name"] for r in rows if "peer_name" in r})
    peer = f"peer ({', '.join(peers)})" if peers else None
    head = ["op", "shape", "pass", "fused ms", "reference ms"] + (["compiled ms"] if compiled else []) + \
        ([f"{peer} ms"] if peer else []) + ["speed-up vs reference"] + (["vs compiled"] if compiled else []) + \
        (["vs peer"] if peer else []) + ["fused peak MiB", "reference peak MiB"] + \
        (["compiled peak MiB"] if compiled else []) + ([f"{peer} peak MiB"] if peer else []) + \
        ["returned MiB", "memory: reference / fused", "copy GB/s", "bound ms", "bound by", "fused / bound"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [r["case"].split()[0], r["desc"], r["mode"], f"{r['fused_ms']:.1f}", f"{r['reference_ms']:.1f}"]
        cells += [f"{r['compiled_ms']:.1f}"] if compiled else []
        cells += [_peer_cell(r, "peer_ms", lambda v: f"{v:.1f}")] if peer else []
        cells += [_ratio(r["reference_ms"], r["fused_ms"])]
        cells += [_ratio(r.get("compiled_ms"), r["fused_ms"])] if compiled else []
        cells += [_peer_cell(r, "peer_ms", lambda v: _ratio(v, r["fused_ms"]))] if peer else []
        cells += [_mib(r, "fused"), _mib(r, "reference")] + ([_mib(r, "compiled")] if compiled else [])
        cells += [_peer_cell(r, "peer_peak", lambda v: _mib(r, "peer"))] if peer else []
        cells += [_mib_text(r["returned"]), _ratio(r["reference_peak"], max(r["fused_peak"], 2**20)),
                  f"{r['copy_gbs']:.1f}", f"{r['bound_ms']:.1f}", r["bound_by"], f"{r['fused_ms'] / r['bound_ms']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def header(device, repeat, compiled, rates, rows, out, allocator=common.SYSTEM_MALLOC_NOTE):
    if device.startswith("cuda"):
        dev = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        dev = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    train_step = TRAIN_STEP["cuda" if device.startswith("cuda") else "cpu"]
    link = os.path.relpath(train_step, os.path.dirname(os.path.abspath(out)))
    peers = ""
    if any("peer_name" in r for r in rows):
        peers = ("Peer: torch_scatter.scatter_mean for class_centroids (labels resized by index); \"not installed\" "
                 "where `import torch_scatter` fails: it has no wheels on PyPI; install a prebuilt wheel matching "
                 "your torch from https://data.pyg.org/whl/ (`pip install torch_scatter -f "
                 "https://data.pyg.org/whl/torch-<version>+<cpu|cuXXX>.html`) or build it "
                 "(`pip install torch_scatter --no-build-isolation`, a long C++ build).\n")
    return (f"Device: {device} ({dev}), torch {torch.__version__}, "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, float32. IDD: euclidean, "
            f"reduction=mean, street-layout labels unless the shape says fragmented (per-pixel random classes "
            f"at feature resolution). Position loss: maps {', '.join(cases.POSITION_KINDS)}.\n"
            f"Allocator: {allocator}.\n"
            f"Times: the best of {repeat} rounds (2 for SKD pool 1; other tenants of the machine only ever add time, "
            f"so the least is the most repeatable), implementations and the copy probe alternating"
            f"{'; compiled = torch.compile(reference), timed after its compilation' if compiled else ''}.\n"
            f"Peak memory: {peak.METHOD}. Returned MiB: the output and (forward+backward) gradient the call "
            f"hands back, which no peak may be below: such an entry is measured again, up to {PEAK_ATTEMPTS} times "
            f"in all, and a '!' marks one that stays below. Memory ratios floor the fused "
            f"peak at 1 MiB.\n"
            f"Bound (roofline): max(bytes moved / copy bandwidth, GEMM flops / GEMM rate at the op's shape, "
            f"exps / exp rate). Copy GB/s (read + write): each row's own, from a 256 MiB copy between existing "
            f"tensors timed in the same alternating rounds as the implementations (best round), because this "
            f"machine's memory bandwidth drifts between minutes; arithmetic peaks measured once in this run: "
            f"{rates.describe()}. 'bound by' names the larger term. "
            f"Bytes: one read of every input, one write of the student's gradient; GEMM flops: SKD's C x C Grams, "
            f"IDD's centroid Grams; exps: one per logit of each network (pixel KD, CWD); elementwise arithmetic "
            f"is left to the memory term (benchmarks/roofline.py).\n{peers}"
            f"Training-step view (CE + each distillation loss at Cityscapes shapes): [{train_step}]({link}), "
            f"from `python -m benchmarks.train_step --update`.\n\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two cases and 3 rounds instead of all cases and 7")
    p.add_argument("--cases", nargs="+", default=None, help="case names to run (default: all, or the quick set)")
    p.add_argument("--skip", nargs="+", default=(), help="case names to leave out")
    p.add_argument("--repeat", type=int, default=None, help="timing rounds (default 7, --quick 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    p.add_argument("--device", default="cpu")
    common.add_allocator_option(p)
    p.add_argument("--out", default=None,
                   help="markdown file to write (default: results/bench-<date-time>/RESULTS.md, a new folder)")
    p.add_argument("--update", action="store_true",
                   help="write the committed benchmarks/RESULTS.md (RESULTS-cuda.md with --device cuda) instead")
    args = p.parse_args(argv)
    allocator = common.apply_allocator_option(args)
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
    rows, rates = measure(names, args.device, repeat, compiled)
    text = header(args.device, repeat, compiled, rates, rows, args.out, allocator) + table(rows)
    print(text)
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"Command: `python -m benchmarks.report {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                + text)
    print(f"written to {args.out}", file=sys.stderr)
    bad = peak.below_returned(rows, cases.IMPLS)
    if bad:
        sys.exit("peak memory below the returned bytes (a measurement error) for: "
                 + "; ".join(" ".join(entry) for entry in bad))


if __name__ == "__main__":
    main()
