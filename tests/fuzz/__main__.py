"""Command line of the differential fuzzer (see tests/fuzz/__init__.py):

    python -m tests.fuzz --targets cpu,cpu_alt,default[,cuda] --cases N --seed S [--ops a,b] [--time-budget SEC]
    python -m tests.fuzz --targets default --repro idd:1000042      # one case again, its inputs printed
    python -m tests.fuzz --size-scale 8 --cases 500 --seed S     # larger maps and more channels
    python -m tests.fuzz --mutate 1.001 --cases 500 --seed S     # gradients 1e-3 off: how many pass

Exit status 1 where a case disagrees with the reference (known differences aside), 2 for a
target that cannot run here.
"""
import argparse
import sys
from pathlib import Path

# the emulator is imported as `cuda_emu`, from tests/, as the test suite does (targets.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from . import inputs  # noqa: E402
from .cases import OPS  # noqa: E402
from .runner import Report, make_case, mutation_check, run, run_case  # noqa: E402
from .targets import TARGETS, unavailable  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="cpu,cpu_alt,default",
                        help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--cases", type=int, default=200, help="cases (each run on every target)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default="", help=f"comma-separated subset of: {', '.join(OPS)}")
    parser.add_argument("--time-budget", type=float, default=None, help="stop starting cases after SEC seconds")
    parser.add_argument("--every", type=int, default=None, help="a progress line every N cases (default: 10 %%)")
    parser.add_argument("--repro", default="", help="OP:SEED: run that one case and print it")
    parser.add_argument("--size-scale", type=int, default=1,
                        help="draw spatial and channel sizes up to this many times their usual bound (default 1)")
    parser.add_argument("--mutate", type=float, default=None,
                        help="scale the first target's gradients by this factor and count the cases that still pass "
                             "(runner.mutation_check) instead of fuzzing")
    args = parser.parse_args(argv)
    if args.size_scale < 1:
        parser.error(f"--size-scale: expected an int >= 1, got {args.size_scale}")
    inputs.SIZE_SCALE = args.size_scale
    targets = [t for t in args.targets.split(",") if t]
    for target in targets:
        why = unavailable(target)
        if why:
            print(f"target {target}: {why}", file=sys.stderr)
            return 2
    if args.repro:
        return repro(args.repro, targets)
    ops = [o for o in args.ops.split(",") if o] or None
    if args.mutate is not None:
        return mutate(ops or list(OPS), targets[0], args.cases, args.seed, args.mutate)
    report = run(targets, args.cases, args.seed, ops, args.time_budget, progress=lambda line: print(line, flush=True),
                 every=args.every)
    print()
    print(report.summary())
    return 0 if report.ok else 1


def repro(spec: str, targets) -> int:
    op, _, seed = spec.rpartition(":")
    case = make_case(op, int(seed))
    print(case.describe())
    report = Report(targets)
    for outcome in run_case(report, op, int(seed), targets):
        print(outcome.reproducer() if not outcome.ok else f"[{outcome.target}] ok, worst error {outcome.worst:.3g}")
        for c in outcome.checks:
            print(f"    {c.what}: error {c.error:.3g}, tolerance {c.tolerance:.3g}{c.note}")
    return 0 if report.ok else 1


def mutate(ops, target: str, cases: int, seed: int, factor: float) -> int:
    print(f"gradients on {target} scaled by {factor}, {cases} cases of each op at seed {seed}:")
    print("op                              held  caught  escaped  noise  failing  other")
    for op in ops:
        t = mutation_check(op, cases, seed, factor, target)
        held = t["caught"] + t["escaped"]
        print(f"{op:30s}  {held:4d}  {t['caught']:6d}  {t['escaped']:7d}  {t['noise']:5d}  {t['failing']:7d}"
              f"  {t['other']:5d}"
              + (f"   ({100 * t['escaped'] / held:.1f} % escaped)" if held else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
