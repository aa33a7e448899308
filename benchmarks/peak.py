"""Peak memory of one call, measured the same way for every implementation (fused, reference,
torch.compile(reference), peers) and on every device: the peak of the running sum of the
allocations and frees that torch's profiler records while the call runs (profile_memory=True).

Everything that allocates through torch is seen, inductor-generated code included; what the
process's heap already holds does not matter, so the call may run in a process that ran others
before. Not seen: memory a C++ kernel takes outside torch's allocator (the fused CPU kernels'
small index tables, O(B*H*W) 4- or 8-byte entries). The caller frees what the previous call
left behind (e.g. the student's gradient) before measuring, since a free inside the call of a
tensor allocated before it would lower the sum.
"""
import contextlib
import os
import sys
import tempfile

from . import common  # first: sets the allocator before torch starts  # noqa: I001
import torch
from torch.profiler import ProfilerActivity, profile

METHOD = ("peak of the running sum of torch's allocations during the measured call (torch.profiler memory "
          "events; same method for every column, the call's own allocations only, whatever the process held before)")


def tensors_of(obj):
    """The tensors in obj (a tensor, or nested tuples/lists of them; None and others skipped)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors_of(item)]
    return []


def nbytes(tensors):
    """Bytes of distinct storages among `tensors`."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def running_peak(deltas):
    """Largest prefix sum of `deltas` (allocation sizes, frees negative), at least 0."""
    peak = total = 0
    for d in deltas:
        total += d
        peak = max(peak, total)
    return peak


@contextlib.contextmanager
def _without_profiler_lines():
    """Drop the two lines the profiler writes to stderr at every start and stop (they would
    bury the progress output); everything else written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sys.stderr.write("".join(line for line in tmp if not line.startswith("USDT:")))


def measure(fn, device="cpu", held=lambda: (), attempts=1, before=lambda: None):
    """(peak bytes, returned bytes) of one call of fn(). Returned bytes: the tensors fn returns
    plus those `held()` names after it (e.g. gradients), which the peak can never be below.
    A peak below them is a measurement that lost events (it happened once in about a hundred
    report entries, to a torch.compile'd backward): the call is measured again, up to
    `attempts` calls in all, each after before() (e.g. freeing the previous gradient)."""
    for _ in range(attempts):
        before()
        peak_bytes, returned = _measure_once(fn, device, held)
        if peak_bytes >= returned:
            break
    return peak_bytes, returned


def _measure_once(fn, device, held):
    kind = "DeviceType." + torch.device(device).type.upper()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if kind == "DeviceType.CUDA" else [])
    common.sync(device)
    with _without_profiler_lines(), profile(activities=activities, profile_memory=True) as prof:
        out = fn()
        common.sync(device)
    returned = nbytes(tensors_of(out) + [t for t in held() if t is not None])
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and str(e.device_type()) == kind]
    events.sort(key=lambda e: e.start_ns())
    return running_peak(e.nbytes() for e in events), returned


def below_returned(rows, impls):
    """Entries whose peak is below the bytes their call returns: [(case, mode, impl), ...].
    rows: dicts with "<impl>_peak" and "<impl>_returned" in bytes, from measure() (an impl
    missing from a row is skipped)."""
    return [(r["case"], r["mode"], impl) for r in rows for impl in impls
            if r.get(impl + "_peak") is not None and r[impl + "_peak"] < r[impl + "_returned"]]
