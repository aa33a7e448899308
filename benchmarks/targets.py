"""The GPU performance targets of issues 21 and 22, as data, and the check that the GPU guard
(`tools/gpu_check.sh`, stage perf and train) runs on the report's rows.

A target names its source issue, the rows it applies to (case names and passes; None: every
row), a metric of the row and a limit. `check(rows, columns)` returns one message per miss,
naming the row, the kernel set, the measured value and the target. Rows are benchmarks.report's
row dicts; a kernel-set column `col` ("fused" for the default kernels, "fused_next" for
IDD_OPS_CUDA_NEXT=1) supplies `{col}_ms`, `{col}_host_ms` and `{col}_launches`.

    python -m benchmarks.targets      # prints the table of targets
"""
import dataclasses

CITY, FRAG = "idd_loss cityscapes", "idd_loss cityscapes fragmented"
FWD, BWD = "forward", "forward+backward"


@dataclasses.dataclass(frozen=True)
class Target:
    source: str      # the issue (and item) that sets it
    cases: tuple     # case names it applies to; None: every row
    modes: tuple     # passes it applies to; None: both
    metric: str      # a key of METRICS
    limit: float
    text: str        # the target in the words

    def applies(self, row):
        return (self.cases is None or row["case"] in self.cases) and (self.modes is None or row["mode"] in self.modes)


def _ms(row, col):
    return row.get(col + "_ms")


def _ratio(num, den):
    return None if num is None or not den else num / den


def _street_ms(row, col, rows):
    """The same op and pass with street labels (the case name without ' fragmented')."""
    street = rows.get((row["case"].replace(" fragmented", ""), row["mode"]))
    return _ms(street, col) if street else None


# metric -> (value(row, col, rows), "min" or "max" allowed, format). rows: {(case, mode): row}.
METRICS = {
    "speed-up vs eager reference": (lambda r, c, rows: _ratio(r.get("reference_ms"), _ms(r, c)), "min", "{:.2f}x"),
    "speed-up vs torch.compile(reference)": (lambda r, c, rows: _ratio(r.get("compiled_ms"), _ms(r, c)), "min",
                                             "{:.2f}x"),
    "share of the bound": (lambda r, c, rows: _ratio(r.get("bound_ms"), _ms(r, c)), "min", "{:.0%}"),
    "time / bound": (lambda r, c, rows: _ratio(_ms(r, c), r.get("bound_ms")), "max", "{:.2f}x"),
    "time / max(2x bound, 0.1 ms)": (
        lambda r, c, rows: _ratio(_ms(r, c), max(2 * r["bound_ms"], 0.1) if r.get("bound_ms") else None), "max",
        "{:.2f}"),
    "graph replay / max(2x bound, 0.1 ms)": (
        lambda r, c, rows: _ratio(r.get(c + "_graph_ms"), max(2 * r["bound_ms"], 0.1) if r.get("bound_ms") else None),
        "max", "{:.2f}"),
    "launches per call": (lambda r, c, rows: r.get(c + "_launches"), "max", "{:.1f}"),
    "host ms per call": (lambda r, c, rows: r.get(c + "_host_ms"), "max", "{:.3f}"),
    "time / street labels": (lambda r, c, rows: _ratio(_ms(r, c), _street_ms(r, c, rows)), "max", "{:.2f}x"),
    "time / default kernels": (lambda r, c, rows: _ratio(_ms(r, c), _ms(r, "fused")) if c != "fused" else None,
                               "max", "{:.2f}x"),
}

# Rows of B=2 (and the 64x128 position maps): launch-bound shapes (issue 22 item 4).
SMALL = ("idd_loss cityscapes-small", "idd_loss b2-c256", "pixel_kd b2", "cwd b2", "skd pool2 b2", "ifvd b2",
         "position_loss 64x128")
# "No slower than today": the kernels that are the default are today's; 5 % allows the run-to-run spread.
NO_SLOWER = 1.05

OPS = [
    Target("issue 22 item 6 (guard)", None, None, "speed-up vs eager reference", 1.0,
           "no fused op slower than its eager reference"),
    Target("issue 22", None, None, "speed-up vs eager reference", 1.5,
           "every fused op and pass at least 1.5x faster than its eager reference"),
    Target("issue 22", None, None, "speed-up vs torch.compile(reference)", 1.0,
           "every fused op and pass at least as fast as torch.compile(reference)"),
    Target("issue 22", ("skd pool2",), (BWD,), "time / bound", 1.5,
           "SKD forward+backward within 1.5x of its GEMM bound"),
    Target("issue 22 item 4", SMALL, (BWD,), "time / max(2x bound, 0.1 ms)", 1.0,
           "every loss forward+backward at small shapes within 2x its bound or 0.1 ms, whichever is larger"),
    Target("issue 22 item 4, captured", SMALL, (BWD,), "graph replay / max(2x bound, 0.1 ms)", 1.0,
           "the same replayed from a CUDA graph (docs/API.md's way past the host's cost at small shapes)"),
    Target("issue 21", (CITY,), (BWD,), "share of the bound", 0.6,
           "IDD forward+backward at least 60 % of the copy bound"),
    Target("issue 21", (CITY,), (BWD,), "speed-up vs torch.compile(reference)", 3.0,
           "IDD forward+backward at least 3x faster than torch.compile(reference)"),
    Target("issue 21 item 3", (CITY,), (BWD,), "launches per call", 6,
           "IDD forward+backward at most 6 launches"),
    Target("issue 21 item 3", (CITY,), (BWD,), "host ms per call", 0.1,
           "IDD forward+backward at most 0.1 ms of host time per call"),
    Target("issue 21", ("class_centroids cityscapes",), (FWD,), "share of the bound", 0.7,
           "class_centroids forward at least 70 % of the bound"),
    Target("issue 21", (FRAG, "class_centroids cityscapes fragmented"), None, "time / street labels", 1.3,
           "fragmented labels within 1.3x of street layouts"),
    # The cosines need the centroids, i.e. a whole pass first: at least two reads of the teacher and,
    # forward then backward, three of the student and its gradient's write. At Cs=512, Ct=2048 with
    # int64 labels that is 1645 MB against the bound's 839 (1.96x): 50 % asks for 98 % of the copy rate.
    Target("issue 21", ("ifvd",), (BWD,), "share of the bound", 0.5,
           "IFVD forward+backward at least 50 % of its bound"),
    Target("issue 21", ("idd_loss ade20k", "idd_loss k1000"), None, "time / default kernels", NO_SLOWER,
           f"K=150 and K=1000 no slower than today (the default kernels in the same run, {NO_SLOWER - 1:.0%} spread)"),
]

# Training-step targets: rows of benchmarks.train_step (loss, ce_ms, {col}_ms, reference_ms).
# A loss's cost is its step minus the CE-only step.
TRAIN_NOISE_MS = 0.5  # two step times differ by this much with identical work (stated, not hidden)
TRAIN = [
    Target("issue 21", ("idd",), None, "share of the step", 0.01, "IDD at most 1 % of the real training step"),
    Target("issue 21", ("ifvd",), None, "share of the step", 0.02, "IFVD at most 2 % of the real training step"),
    Target("issue 22", None, None, "cost - reference cost (ms)", TRAIN_NOISE_MS,
           f"in the real training step no loss costs more fused than its reference ({TRAIN_NOISE_MS} ms noise allowed)"),
]
TRAIN_METRICS = {
    "share of the step": (lambda r, c: (r[c + "_ms"] - r["ce_ms"]) / r[c + "_ms"], "max", "{:.1%}"),
    "cost - reference cost (ms)": (lambda r, c: r[c + "_ms"] - r["reference_ms"], "max", "{:+.1f}"),
}


def _verdict(target, value, fmt, better):
    ok = value <= target.limit if better == "max" else value >= target.limit
    return ok, fmt.format(value), fmt.format(target.limit)


def check(rows, columns=("fused",)):
    """Messages for every target a measured row misses, for each kernel-set column present."""
    by_key = {(r["case"], r["mode"]): r for r in rows}
    misses = []
    for target in OPS:
        value_of, better, fmt = METRICS[target.metric]
        for row in rows:
            if not target.applies(row):
                continue
            for col in columns:
                value = value_of(row, col, by_key) if _ms(row, col) is not None else None
                if value is None:
                    continue  # not measured in this run (no compile column, no next kernels, ...)
                ok, got, limit = _verdict(target, value, fmt, better)
                if not ok:
                    # a host-time miss beside what plain PyTorch's least forward(+backward) costs there
                    floor = f"; torch floor {row['floor_host_ms']:.3f}" if target.metric == "host ms per call" \
                        and row.get("floor_host_ms") is not None else ""
                    misses.append(f"{row['case']} {row['mode']} [{_label(col)}]: {target.metric} {got}{floor}, "
                                  f"target {'<=' if better == 'max' else '>='} {limit} ({target.source}: {target.text})")
    return misses


def check_train(rows, columns=("fused",)):
    """Misses of the training-step targets. rows: dicts with loss, ce_ms, reference_ms, {col}_ms."""
    misses = []
    for target in TRAIN:
        value_of, better, fmt = TRAIN_METRICS[target.metric]
        for row in rows:
            if target.cases is not None and row["loss"] not in target.cases:
                continue
            for col in columns:
                if row.get(col + "_ms") is None or (row.get("reference_ms") is None and "reference" in target.metric) \
                        or (row.get("ce_ms") is None and "share" in target.metric):
                    continue  # a child stopped at its time limit leaves rows without these
                ok, got, limit = _verdict(target, value_of(row, col), fmt, better)
                if not ok:
                    misses.append(f"train step, {row['loss']} [{_label(col)}]: {target.metric} {got}, target "
                                  f"{'<=' if better == 'max' else '>='} {limit} ({target.source}: {target.text})")
    return misses


def _label(col):
    from .common import KERNEL_SETS  # here, not at the top: this module stays free of torch
    return {"fused": "default kernels", "fused_next": f"IDD_OPS_CUDA_NEXT={KERNEL_SETS['next']}"}.get(col, col)


def guard_failures(misses):
    """The misses of the regression guard (a fused op slower than its eager reference)."""
    return [m for m in misses if "(guard)" in m]


def table():
    out = ["| source | rows | pass | metric | limit | target |", "|---|---|---|---|---:|---|"]
    for t, metrics in [(t, METRICS) for t in OPS] + [(t, TRAIN_METRICS) for t in TRAIN]:
        better, fmt = metrics[t.metric][1], metrics[t.metric][2]
        rows = "every row" if t.cases is None else ", ".join(t.cases)
        out.append(f"| {t.source} | {rows} | {', '.join(t.modes) if t.modes else 'both'} | {t.metric} | "
                   f"{'<=' if better == 'max' else '>='} {fmt.format(t.limit)} | {t.text} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(table())
