"""A fuzzing run: cases over ops and targets, within a case count and a time budget, and its
report (a table per op x target, and each mismatch's reproducer).

Case i of a run with seed S is op ``ops[i % len(ops)]`` with case seed ``S * 1_000_000 + i``:
every op gets its share of a short run, and a case is the same whatever else the run does
(``--repro op:seed`` replays one).
"""
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cases import OPS, make_case  # noqa: F401  (make_case: also for the command line)
from .compare import Outcome, expected, run_on

SEED_STRIDE = 1_000_000


@dataclass
class Tally:
    cases: int = 0
    mismatches: int = 0
    known: int = 0
    worst: float = 0.0  # the largest error, known differences aside (inf: a non-finite disagreement)
    worst_ratio: float = 0.0  # the largest error / tolerance
    seconds: float = 0.0


@dataclass
class Report:
    targets: Sequence[str]
    tallies: Dict[Tuple[str, str], Tally] = field(default_factory=dict)
    mismatches: List[Outcome] = field(default_factory=list)
    known: List[Outcome] = field(default_factory=list)
    cases: int = 0
    seconds: float = 0.0
    stopped_by_budget: bool = False

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def add(self, outcome: Outcome, seconds: float):
        t = self.tallies.setdefault((outcome.case.op, outcome.target), Tally())
        t.cases += 1
        t.seconds += seconds
        if outcome.checks and not (not outcome.ok and outcome.known):  # known differences are listed apart
            t.worst = max(t.worst, outcome.worst)
            t.worst_ratio = max(t.worst_ratio, max(c.ratio for c in outcome.checks))
        if not outcome.ok:
            if outcome.known:
                t.known += 1
                self.known.append(outcome)
            else:
                t.mismatches += 1
                self.mismatches.append(outcome)

    def table(self) -> str:
        rows = [("op", "target", "cases", "mismatches", "known", "worst rel err", "worst err/tol", "seconds")]
        for (op, target), t in sorted(self.tallies.items(), key=lambda kv: (list(OPS).index(kv[0][0]), kv[0][1])):
            rows.append((op, target, str(t.cases), str(t.mismatches), str(t.known), f"{t.worst:.2e}",
                         f"{t.worst_ratio:.3g}", f"{t.seconds:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])

    def summary(self, show_known: int = 3) -> str:
        head = (f"{self.cases} cases x {len(self.targets)} targets ({', '.join(self.targets)}) in {self.seconds:.1f} s"
                + (" (stopped by the time budget)" if self.stopped_by_budget else "")
                + f": {len(self.mismatches)} mismatches, {len(self.known)} known differences")
        parts = [head, self.table()]
        if self.mismatches:
            parts.append("mismatches:\n" + "\n".join(o.reproducer() for o in self.mismatches))
        if self.known and show_known:
            parts.append(f"known differences (first {min(show_known, len(self.known))} of {len(self.known)}):\n"
                         + "\n".join(o.reproducer() for o in self.known[:show_known]))
        return "\n\n".join(parts)


def run(targets: Sequence[str], cases: int, seed: int = 0, ops: Optional[Sequence[str]] = None,
        time_budget: Optional[float] = None, progress: Optional[Callable[[str], None]] = None,
        every: Optional[int] = None) -> Report:
    """Up to `cases` cases (each on every target), stopping early past `time_budget` seconds.
    `progress` gets a line every `every` cases (default: a tenth of the run)."""
    ops = list(ops or OPS)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; expected any of {', '.join(OPS)}")
    every = every or max(1, cases // 10)
    report = Report(list(targets))
    start = time.perf_counter()
    for i in range(cases):
        if time_budget is not None and time.perf_counter() - start > time_budget:
            report.stopped_by_budget = True
            break
        run_case(report, ops[i % len(ops)], seed * SEED_STRIDE + i, targets)
        report.cases += 1
        if progress and (report.cases % every == 0 or report.cases == cases):
            progress(f"{report.cases}/{cases} cases, {time.perf_counter() - start:.1f} s, "
                     f"{len(report.mismatches)} mismatches, {len(report.known)} known")
    report.seconds = time.perf_counter() - start
    return report


def run_case(report: Report, op: str, case_seed: int, targets: Sequence[str]) -> List[Outcome]:
    case = make_case(op, case_seed)
    t0 = time.perf_counter()
    want = expected(case)
    ref_seconds = (time.perf_counter() - t0) / max(1, len(targets))  # its share of each target's time
    outcomes = []
    for target in targets:
        t0 = time.perf_counter()
        outcome = run_on(case, target, want)
        report.add(outcome, time.perf_counter() - t0 + ref_seconds)
        outcomes.append(outcome)
    return outcomes


def mutation_check(op: str, cases: int, seed: int, factor: float, target: str = "cpu",
                   precisions=("float64", "float32")) -> Counter:
    """How tightly the tolerances and noise allowances hold the gradients of `op`: each case's
    input gradients on `target` scaled by `factor`, each gradient counted as "caught" (the case
    then fails), "escaped" (it still passes), "noise" (a gradient that is 0, or whose unscaled
    error is over a tenth of what the scaling adds: nothing to hold) or "failing" (the unscaled
    case already fails); cases of another precision count as "other" (the suite's tolerances of
    the half types, 2e-2 and 5e-2, pass a planted error of 1e-2)."""
    tally = Counter()
    for i in range(cases):
        case = make_case(op, seed * SEED_STRIDE + i)
        want = expected(case)
        if want.raised:
            continue
        if want.precision not in precisions:
            tally["other"] += 1
            continue
        base = run_on(case, target, want)
        if not base.ok:
            tally["failing"] += 1
            continue
        planted = run_on(case, target, want, grad_scale=factor)
        assert planted.raised or len(planted.checks) == len(base.checks), (case.seed, planted.checks)
        for k, plain in enumerate(base.checks):
            if not plain.what.startswith("grad:"):
                continue
            g = want.outputs[plain.what]
            g = g[torch.isfinite(g)]  # compare.error holds the finite entries; the others must agree exactly
            size = float(g.abs().max()) if g.numel() else 0.0
            if size == 0 or plain.absolute > abs(factor - 1) * size / 10:
                tally["noise"] += 1
            else:
                tally["caught" if planted.raised or not planted.checks[k].ok else "escaped"] += 1
    return tally
