"""Fused vs reference report: time, speed-up, peak memory and the roofline bound (with the
resource that binds it) for every case of benchmarks/cases.py. Prints a markdown table and
writes it to a new folder, results/bench-<date-time>/RESULTS.md, unless --out names a file or
--update replaces the committed benchmarks/RESULTS.md (RESULTS-cuda.md with --device cuda).

    python -m benchmarks.report            # every op at B=8 Cityscapes shapes (tens of minutes)
    python -m benchmarks.report --quick    # IDD at B=2 and the position loss, 3 rounds (1 min)
    python -m benchmarks.report --update   # every op, written to benchmarks/RESULTS.md
    python -m benchmarks.report --device cuda --guard --kernels default   # tools/gpu_check.sh's perf stage

--kernels runs each CUDA kernel set in its own child process (IDD_OPS_CUDA_NEXT is read once per
process): the first measures every implementation, the second the fused op alone ('fused next'
columns). --guard: the key rows of cases.GUARD, torch.compile for cases.GUARD_COMPILE, no peak
memory, and the targets of benchmarks/targets.py checked (exit status 1 on a miss). On CUDA the
IDD rows also get host time and launches per call.

The training-step view is a separate script and file: python -m benchmarks.train_step.
Each entry prints its progress and the time left. Exits with status 1 (after writing the table)
if a peak-memory entry is below the bytes its call returns, which no correct measurement gives.
"""
import argparse
import json
import os
import sys
import time
import traceback

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
from . import cases, cli, kernel_times, roofline, targets
from .report_tables import PEAK_ATTEMPTS, compact_table, header, merge_kernel_sets, summary_section, table

MODES = (False, True)
MODES_TEXT = {False: "forward", True: "forward+backward"}
EXPECTED = {"full": "tens of minutes on 2 CPU cores (not timed end to end; the time left is printed after every entry)",
            "quick": "about 1 min on 2 CPU cores (measured)",
            "guard": "about 1 min on an H200 with a warm compile cache (the GPU check's perf stage)"}


# Ops whose rows also get host time, launches and each kernel's time per call on a GPU (issue 21's
# targets); and ops whose forward+backward rows get them (kernel_times.py: where their time goes).
# The forward+backward rows of the small shapes (targets.SMALL) also get their time replayed from
# a CUDA graph (issue 22 item 4).
LAUNCH_OPS = ("idd_loss", "class_centroids")
KERNEL_OPS = ("ifvd", "pixel_kd", "cwd", "skd")


def measure_row(case, backward, device, repeat, compiled, rates, probe, impls=None, peaks=True, launch_stats=False,
                graph_stats=False):
    """One table row: times (alternating, with the copy probe), peaks (profiler) unless not
    asked, bound (where rates are given), with launch_stats the fused op's host time and
    launches per call, and with graph_stats its time replayed from a CUDA graph
    (common.graph_ms; inf where the capture fails, so that the guard's target fails, its error
    printed); for case and pass.
    impls: default case.impls(compiled)."""
    impls = impls or case.impls(compiled)
    *times, probe_ms = common.time_interleaved([case.build(impl, backward) for impl in impls] + [probe], device,
                                               repeat=min(repeat, case.rounds or repeat), stat=min)
    student = case.inputs[0]
    row = dict(case=case.name, desc=case.desc, mode="forward+backward" if backward else "forward",
               rounds=min(repeat, case.rounds or repeat))
    row["copy_gbs"] = probe.rate(probe_ms) / 1e9
    if rates is not None:
        row["bound_ms"], row["bound_by"] = rates.bound(case.work(backward), row["copy_gbs"] * 1e9)
    for impl, t in zip(impls, times):
        row[impl + "_ms"] = t
        if peaks:
            run = case.build(impl, backward)
            row[impl + "_peak"], row[impl + "_returned"] = peak.measure(
                run, device, held=lambda: [student.grad] if backward else [], attempts=PEAK_ATTEMPTS,
                before=lambda: setattr(student, "grad", None))  # the previous call's gradient, freed
    if peaks:
        row["returned"] = min(row[impl + "_returned"] for impl in impls)
    if launch_stats and "fused" in impls:
        run = case.build("fused", backward)
        row["fused_host_ms"] = common.host_ms(run, device)
        row["floor_host_ms"] = common.autograd_floor_ms(device, backward)
        row["fused_launches"], row["fused_kernels"], row["fused_host_calls"] = kernel_times.profile(run, device)
    if graph_stats and "fused" in impls:
        try:
            row["fused_graph_ms"] = common.graph_ms(case.build("fused", backward), device)
        except Exception:  # noqa: BLE001 - a column of its own: the row's other numbers stand
            row["fused_graph_ms"] = float("inf")
            print(f"ERROR capturing {case.name} in a CUDA graph:", file=sys.stderr, flush=True)
            traceback.print_exc()
    if case.peer:
        row["peer_name"] = case.peer[0]
    return row


def measure(case_names, device, repeat, compiled, impls=None, peaks=True, compile_names=None, launch_stats=None,
            progress=None, errors=None):
    """Rows of every case and pass. compiled: a torch.compile(reference) column, for the cases in
    compile_names only where given. impls: the implementations (default: each case's own; the
    bound is measured only with the reference). launch_stats: host time and launches of the
    fused op for LAUNCH_OPS (default: on CUDA). progress(rows, rates): called after every row.
    errors: a list, to keep going past a case that raises (its message is appended, and a case
    that failed with its compiled column is measured again without it); else the error propagates."""
    with_rates = impls is None or "reference" in impls
    rates, probe = roofline.Rates(device) if with_rates else None, common.CopyProbe(device)
    if launch_stats is None:
        launch_stats = device.startswith("cuda")
    rows, total, step = [], len(case_names) * len(MODES), 0
    start = time.perf_counter()
    for name in case_names:
        compile_case = compiled and (compile_names is None or name in compile_names)
        for attempt in (compile_case, False) if compile_case else (False,):
            new, case = [], None
            try:
                case = cases.make(name, device)
                case_impls = [i for i in (impls or case.impls(attempt)) if i != "compiled" or attempt]
                for backward in MODES:
                    elapsed = time.perf_counter() - start
                    left = f", about {elapsed / step * (total - step) / 60:.1f} min left" if step else ""
                    step += 1
                    print(f"[{step}/{total}] {name} {MODES_TEXT[backward]} ({elapsed / 60:.1f} min so far{left})",
                          file=sys.stderr, flush=True)
                    op = name.split()[0]
                    stats = launch_stats and (op in LAUNCH_OPS or (backward and op in KERNEL_OPS))
                    graph = launch_stats and backward and name in targets.SMALL
                    new.append(measure_row(case, backward, device, repeat, attempt, rates, probe, impls=case_impls,
                                           peaks=peaks, launch_stats=stats, graph_stats=graph))
                rows.extend(new)
                if progress:
                    progress(rows, rates)
                break
            except Exception as error:  # noqa: BLE001 - reported, and the other cases still measured
                if errors is None:
                    raise
                step -= len(new)
                message = f"{name}{' (with torch.compile)' if attempt and case else ''}: {type(error).__name__}: {error}"
                errors.append(message[:500])
                print(f"ERROR {message}", file=sys.stderr, flush=True)
                traceback.print_exc()
                if case is None:
                    break  # it could not be built: no second attempt
            finally:
                case = None  # frees its inputs before the next case
    return rows, rates


def warm_compile(case_names, device):
    """Compiles torch.compile(reference) of each case, forward and backward, once: fills the
    on-disk inductor cache, so that a later report process (the GPU check's perf stage, which
    runs this during the build) compiles from it."""
    for name in case_names:
        t0 = time.perf_counter()
        cases.make(name, device).build("compiled", True)()
        common.sync(device)
        print(f"compiled {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _child_argv(args, names, kernel_set, path):
    """A child report's arguments: the same cases and settings for one kernel set; the first set
    measures every implementation, a later one the fused op alone."""
    argv = ["--device", args.device, "--cases", *names, "--repeat", str(args.repeat), "--rows-json", path]
    argv += ["--no-peak"] if args.no_peak else []
    argv += ["--no-compile"] if args.no_compile else []
    argv += ["--compile-cases", *args.compile_cases] if args.compile_cases else []
    argv += ["--system-malloc"] if args.system_malloc else []
    return argv + ([] if kernel_set == args.kernels[0] else ["--impls", "fused"])


class _Described:
    """Rates measured in a child process: its description only."""

    def __init__(self, text):
        self.text = text

    def describe(self):
        return self.text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two cases and 3 rounds instead of all cases and 7")
    p.add_argument("--guard", action="store_true",
                   help="the GPU check's perf stage: the key rows (cases.GUARD), torch.compile for cases.GUARD_COMPILE "
                        "only, no peak memory, 5 rounds, targets checked (benchmarks/targets.py; exit 1 on a miss)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="case names to run (default: all, or the quick set); names: " + "; ".join(cases.NAME_FORMS))
    p.add_argument("--skip", nargs="+", default=(), help="case names to leave out")
    p.add_argument("--repeat", type=cli.positive_int, default=None,
                   help="timing rounds (default 7, --quick 3, --guard 5)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    p.add_argument("--compile-cases", nargs="+", default=None, help="the torch.compile column for these cases only")
    p.add_argument("--warm-compile", action="store_true",
                   help="only compile each case's reference once (fills the on-disk inductor cache) and exit")
    common.add_kernel_set_options(p, "2:1")
    p.add_argument("--targets", action="store_true", help="check benchmarks/targets.py; exit 1 if one is missed")
    p.add_argument("--summary", default=None, help="also write the compact table and the misses to this file")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--device", type=cli.device, default="cpu")
    common.add_allocator_option(p)
    p.add_argument("--out", default=None,
                   help="markdown file to write (default: results/bench-<date-time>/RESULTS.md, a new folder)")
    p.add_argument("--update", action="store_true",
                   help="write the committed benchmarks/RESULTS.md (RESULTS-cuda.md with --device cuda) instead")
    args = p.parse_args(argv)
    for name in [*(args.cases or ()), *args.skip, *(args.compile_cases or ())]:
        try:
            cases.check_name(name)
        except ValueError as error:
            p.error(str(error))
    if args.update and (args.cases or args.skip or args.quick or args.guard):
        p.error("--update rewrites the whole committed table: run every case (no --cases, --skip, --quick or "
                "--guard), or write a subset with --out")
    if args.guard:
        args.no_peak, args.targets = True, True
        args.compile_cases = args.compile_cases or cases.GUARD_COMPILE
    allocator = common.apply_allocator_option(args)
    on_cuda = args.device.startswith("cuda")
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5 if args.guard else 7
    compiled = not (args.no_compile or args.quick)
    default_cases = cases.QUICK if args.quick else cases.GUARD if args.guard else \
        (cases.CUDA_FULL if on_cuda else cases.FULL)
    names = [c for c in (args.cases or default_cases) if c not in args.skip]
    if not names:
        p.error("--skip: leaves no case to run")
    if args.warm_compile:
        return warm_compile([n for n in names if args.compile_cases is None or n in args.compile_cases], args.device)
    if args.rows_json:  # a child of --kernels: rows only
        errors = []

        def progress(rows, rates):
            common.write_json(args.rows_json, dict(rows=rows, rates=rates.describe() if rates else "", errors=errors))
        rows, rates = measure(names, args.device, args.repeat, compiled, impls=args.impls, peaks=not args.no_peak,
                              compile_names=args.compile_cases, progress=progress, errors=errors)
        progress(rows, rates)  # the errors of the last cases too
        return
    committed = "benchmarks/RESULTS-cuda.md" if on_cuda else "benchmarks/RESULTS.md"
    if args.update and args.out:
        p.error(f"--update writes {committed}; leave out --out")
    cli.check_file_paths(p, out=args.out, json=args.json, summary=args.summary)
    args.out = committed if args.update else args.out or os.path.join(
        "results", time.strftime("bench-%Y%m%d-%H%M%S"), os.path.basename(committed))
    expected = "" if args.cases else EXPECTED["quick" if args.quick else "guard" if args.guard else "full"] + "; "
    print(f"benchmarks.report: {expected}writing {args.out}", file=sys.stderr, flush=True)
    errors, columns = [], ["fused"]
    if args.kernels:
        results, errors = common.run_per_kernel_set(
            "benchmarks.report", lambda ks, path: _child_argv(args, names, ks, path), args.kernels,
            time_limit=args.time_limit, weights=[2, 1])
        errors += [f"{ks} kernels: {e}" for ks in args.kernels for e in (results.get(ks) or {}).get("errors", [])]
        base = results.get(args.kernels[0])
        if not base or not base["rows"]:
            sys.exit(f"the {args.kernels[0]} kernels' report failed: {'; '.join(errors)}")
        rows, rates = base["rows"], _Described(base["rates"])
        if len(args.kernels) > 1 and results.get(args.kernels[1]) is not None:
            rows, columns = merge_kernel_sets(rows, results[args.kernels[1]]["rows"]), ["fused", "fused_next"]
    else:
        # a case that fails is reported and the others still measured and written
        rows, rates = measure(names, args.device, args.repeat, compiled, peaks=not args.no_peak,
                              compile_names=args.compile_cases, errors=errors)
        if not rows:
            sys.exit(f"no case could be measured: {'; '.join(errors)}")
    text = header(args.device, args.repeat, compiled, rates, rows, args.out, allocator, args.kernels) + table(rows) \
        + kernel_times.section(rows)
    print(text)
    with cli.open_for_writing(args.out) as f:
        f.write(f"Command: `{cli.command_line('benchmarks.report', argv)}`\n\n" + text)
    print(f"written to {args.out}", file=sys.stderr)
    if args.json:
        with cli.open_for_writing(args.json) as f:
            json.dump(rows, f, indent=1)
    misses = targets.check(rows, columns) if args.targets else []
    if args.summary:
        with cli.open_for_writing(args.summary) as f:
            f.write(summary_section(rows, misses, columns if args.targets else (), errors))
    print(compact_table(rows) + "".join(f"MISSED {m}\n" for m in misses) + "".join(f"ERROR {e}\n" for e in errors))
    bad = peak.below_returned(rows, cases.IMPLS) if not args.no_peak else []
    if bad:
        sys.exit("peak memory below the returned bytes (a measurement error) for: "
                 + "; ".join(" ".join(entry) for entry in bad))
    if misses or errors:
        sys.exit(f"{len(misses)} targets missed ({len(targets.guard_failures(misses))} guard failures), "
                 f"{len(errors)} errors")


if __name__ == "__main__":
    main()
