"""Where a fused op's GPU time goes: its launches per call and each kernel's device time per call,
from one torch.profiler run, and the report's section that lists them (RESULTS-cuda.md).

The report profiles the fused op of the rows that get launch statistics (report.LAUNCH_OPS, and
the forward+backward rows of report.KERNEL_OPS), in each kernel set's own process, so one GPU
run shows which kernel of a row falls short of its bound and whether the row waits on the host
(kernel time per call well under the row's time), and where the host's time goes: the CUDA runtime
and driver calls the op makes (a launch, an attribute set, or a call that waits on the GPU).
"""
import re

from . import kernel_predictions
from .common import count_launches, sync

# Kernels listed per row: the rest are summed into one line.
TOP = 6
# Runtime calls listed per row.
TOP_HOST = 4
# The harness's own synchronise, named so that its runtime calls are left out of the op's.
SYNC_LABEL = "kernel_times: synchronise"


def profile(fn, device="cuda", calls=3):
    """(launches per call, [(kernel, launches per call, device us per call)] longest first,
    [(runtime call, calls per call, host us per call)] longest first) of `calls` calls of fn after
    a warm-up call. On a device without device-side records (the CPU) both lists are empty."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        with record_function(SYNC_LABEL):
            sync(device)
    events = prof.events()
    return count_launches(events) / calls, per_kernel(events, calls), host_calls(events, calls)


def per_kernel(events, calls):
    """[(kernel label, launches per call, device us per call)] of the device-side records of
    `events`, longest first."""
    totals = {}
    for e in events:
        if getattr(e.device_type, "name", "") != "CUDA":
            continue
        name = label(e.name)
        n, us = totals.get(name, (0, 0.0))
        totals[name] = (n + 1, us + e.time_range.elapsed_us())
    return sorted(((name, n / calls, us / calls) for name, (n, us) in totals.items()), key=lambda k: -k[2])


def host_calls(events, calls):
    """[(runtime call, calls per call, host us per call)] of the CUDA runtime and driver calls
    among `events` (names starting cuda/cu, on the host; the harness's synchronise left out),
    longest first. A call that waits on the GPU (a synchronise, a blocking copy) shows here with
    the time it waited, which a host time near the device time then explains. Where the profiler
    records a driver call inside a runtime call, both are listed (the total counts that time twice).
    Calls from the harness's synchronise on are not the op's: the profiler synchronises again itself
    as it stops (torch 2.11: torch.autograd.profiler's stop_trace), after the labelled range."""
    harness = min((e.time_range.start for e in events if e.name == SYNC_LABEL), default=None)
    totals = {}
    for e in events:
        if getattr(e.device_type, "name", "") != "CPU" or not re.match(r"cu[A-Z]|cuda[A-Z]", e.name):
            continue
        if harness is not None and e.time_range.start >= harness:
            continue
        n, us = totals.get(e.name, (0, 0.0))
        totals[e.name] = (n + 1, us + e.time_range.elapsed_us())
    return sorted(((name, n / calls, us / calls) for name, (n, us) in totals.items()), key=lambda k: -k[2])


_QUALIFIERS = re.compile(r"(?:\b(?:idd_ops|at|native|c10|cuda|class_sums_cuda)|\(anonymous namespace\))::")


def label(name, width=90):
    """A kernel's demangled name, short: no return type, no argument list, no namespaces."""
    name = re.sub(r"^void ", "", name.strip())
    depth = 0
    for i, ch in enumerate(name):  # cut at the argument list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            name = name[:i]
            break
    name = _QUALIFIERS.sub("", name).strip()
    return name if len(name) <= width else name[:width - 3] + "..."


def section(rows):
    """Markdown: per profiled row and kernel set, its kernels' device time per call against the
    row's time (the TOP longest and every predicted one, the rest as one line), with each
    prediction (kernel_predictions.py) beside its kernel and the predictions missed listed last."""
    out = []
    for r in rows:
        for key, kernel_set in (("fused", "default"), ("fused_next", "next")):
            kernels = r.get(key + "_kernels")
            if not kernels:
                continue
            busy = sum(us for _, _, us in kernels) / 1e3
            guesses = [kernel_predictions.prediction(r, kernel_set, name, rows) for name, _, _ in kernels]
            predicted = any(guesses)
            columns = ("| kernel | launches/call | us/call | predicted us/call |\n|---|---:|---:|---:|" if predicted
                       else "| kernel | launches/call | us/call |\n|---|---:|---:|")
            out.append(f"\n**{r['case']}, {r['mode']}, {kernel_set} kernels**: {r[key + '_ms']:.3f} ms a call, "
                       f"kernels {busy:.3f} ms ({busy / r[key + '_ms']:.0%}), {r.get(key + '_launches', 0):.1f} "
                       f"launches\n\n{columns}")
            listed = [i for i, guess in enumerate(guesses) if i < TOP or guess]
            rest = [kernels[i] for i in range(len(kernels)) if i not in listed]
            for i in listed:
                name, n, us = kernels[i]
                guess = guesses[i]
                cell = f" {guess[0]:g} ({us / guess[0]:.1f}x) |" if guess else " - |" if predicted else ""
                out.append(f"| `{name}` | {n:.1f} | {us:.1f} |{cell}")
            if rest:
                out.append(f"| {len(rest)} others | {sum(n for _, n, _ in rest):.1f} | "
                           f"{sum(us for _, _, us in rest):.1f} |" + (" |" if predicted else ""))
            host = r.get(key + "_host_calls")
            if host:
                listed = ", ".join(f"`{name}` {n:.1f} x {us / n:.1f} us" for name, n, us in host[:TOP_HOST])
                out.append(f"\nHost, runtime calls per call: {sum(us for _, _, us in host):.1f} us in all; {listed}.")
    if not out:
        return ""
    missed = kernel_predictions.misses(rows)
    if missed:
        out.append(f"\nPredictions missed (over {kernel_predictions.MISS:g}x, or the kernel did not run; "
                   "benchmarks/kernel_predictions.py):\n")
        out += [f"- {m}" for m in missed]
    return ("\n## Kernels per call\n\nDevice time per call of each kernel (torch.profiler, 3 calls after a warm-up), "
            "per kernel set; kernels' time well under the row's time means the row waits on the host. Where "
            "a kernel's time was predicted before a GPU ran it (benchmarks/kernel_predictions.py), the prediction "
            "and measured / predicted. Under each table, the host's CUDA runtime calls per call (the longest; a "
            "call that waits on the GPU shows the wait).\n"
            + "\n".join(out) + "\n")
