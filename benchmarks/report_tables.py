"""The report's markdown: the full table, the header that says how every column was measured,
the GPU check's compact table and summary section, and the merge of a second kernel set's rows
(fused_next_* columns). benchmarks/report.py measures the rows and writes these."""
import math
import os

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
from . import cases, kernel_predictions, targets
import torch

from idd_ops._switches import cuda_next_enabled

PEAK_ATTEMPTS = 3  # measurements of a peak that comes out below the returned bytes
TRAIN_STEP = {"cpu": "benchmarks/TRAIN_STEP.md", "cuda": "benchmarks/TRAIN_STEP-cuda.md"}
LAUNCH_NOTE = ("Host ms/call: 20 calls issued without a synchronise, divided by 20 (the host's cost where the GPU "
               "keeps up). Torch floor: the same of plain PyTorch's `(x * 2).sum()` on 8 values (and its backward), "
               "the least any loss's host time can be on this machine. Launches/call: kernels, memsets and copies "
               "on the GPU per call (torch.profiler, 3 calls); forward+backward seeds the backward with a gradient "
               "made once, so the harness adds none. Graph ms: the small shapes' forward+backward captured in a "
               "CUDA graph and replayed, the best of 20 synchronised replays (the issue cost of a captured step: "
               "docs/API.md, \"CUDA graphs\"; '-' where not captured, inf where the capture failed). ")


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


def _ms_cell(row, key, digits=None):
    """row[key] with `digits` decimals; by default three significant figures below 10 (a 0.03 ms
    bound shown as 0.0 hid the row), one decimal above."""
    value = row.get(key)
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if digits is None:
        digits = 1 if abs(value) >= 10 or value == 0 else max(1, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def table(rows):
    """The markdown table; columns that no row has (compiled, next kernels, peer, peaks, host
    time and launches, CUDA-graph replays) are left out."""
    has = lambda key: any(r.get(key) is not None for r in rows)  # noqa: E731
    compiled, nxt, peaks, launches = has("compiled_ms"), has("fused_next_ms"), has("fused_peak"), has("fused_host_ms")
    graphs = has("fused_graph_ms") or has("fused_next_graph_ms")
    peers = sorted({r["peer_name"] for r in rows if "peer_name" in r})
    peer = f"peer ({', '.join(peers)})" if peers else None
    head = ["op", "shape", "pass", "fused ms"] + (["fused next ms"] if nxt else []) + ["reference ms"] + \
        (["compiled ms"] if compiled else []) + ([f"{peer} ms"] if peer else []) + ["speed-up vs reference"] + \
        (["vs compiled"] if compiled else []) + (["vs peer"] if peer else []) + \
        (["next vs default", "next vs reference"] if nxt else []) + \
        (["fused host ms/call", "fused launches/call"] + (["next host ms/call", "next launches/call"] if nxt else [])
         + ["torch floor host ms/call"] if launches else [])
    head += ["fused graph ms"] + (["next graph ms"] if nxt else []) if graphs else []
    if peaks:
        head += ["fused peak MiB", "reference peak MiB"] + (["compiled peak MiB"] if compiled else []) + \
            ([f"{peer} peak MiB"] if peer else []) + ["returned MiB", "memory: reference / fused"]
    head += ["copy GB/s", "bound ms", "bound by", "fused / bound"] + (["next / bound"] if nxt else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [r["case"].split()[0], r["desc"], r["mode"], _ms_cell(r, "fused_ms")]
        cells += [_ms_cell(r, "fused_next_ms")] if nxt else []
        cells += [_ms_cell(r, "reference_ms")]
        cells += [_ms_cell(r, "compiled_ms")] if compiled else []
        cells += [_peer_cell(r, "peer_ms", lambda v: f"{v:.1f}")] if peer else []
        cells += [_speedup(r.get("reference_ms"), r["fused_ms"])]
        cells += [_speedup(r.get("compiled_ms"), r["fused_ms"])] if compiled else []
        cells += [_peer_cell(r, "peer_ms", lambda v: _speedup(v, r["fused_ms"]))] if peer else []
        if nxt:
            cells += [_speedup(r["fused_ms"], r.get("fused_next_ms")),
                      _speedup(r.get("reference_ms"), r.get("fused_next_ms"))]
        if launches:
            cells += [_ms_cell(r, "fused_host_ms", 3), _ms_cell(r, "fused_launches", 1)]
            cells += [_ms_cell(r, "fused_next_host_ms", 3), _ms_cell(r, "fused_next_launches", 1)] if nxt else []
            cells += [_ms_cell(r, "floor_host_ms", 3)]
        if graphs:
            cells += [_ms_cell(r, "fused_graph_ms", 3)] + ([_ms_cell(r, "fused_next_graph_ms", 3)] if nxt else [])
        if peaks:
            cells += [_mib(r, "fused"), _mib(r, "reference")] + ([_mib(r, "compiled")] if compiled else [])
            cells += [_peer_cell(r, "peer_peak", lambda v: _mib(r, "peer"))] if peer else []
            cells += [_mib_text(r["returned"]), _ratio(r["reference_peak"], max(r["fused_peak"], 2**20))]
        bound = r.get("bound_ms")
        cells += [f"{r['copy_gbs']:.1f}", _ms_cell(r, "bound_ms"), r.get("bound_by", "-"), _ratio2(r["fused_ms"], bound)]
        cells += [_ratio2(r.get("fused_next_ms"), bound)] if nxt else []
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _ratio2(num, den):
    return f"{num / den:.2f}" if num is not None and den else "-"


def _speedup(num, den):
    """Two decimals: a guard decides at 1.00x."""
    return _ratio2(num, den) + "x" if num is not None and den else "-"


def kernels_note(kernel_sets):
    """The header's sentence on which CUDA kernels the fused columns ran."""
    if not kernel_sets:
        spec = os.environ.get("IDD_OPS_CUDA_NEXT")
        return f"Kernels: {f'IDD_OPS_CUDA_NEXT={spec}' if cuda_next_enabled() else 'the default set'}.\n"
    named = {"default": "the default set", "next": f"IDD_OPS_CUDA_NEXT={common.KERNEL_SETS['next']}"}
    text = f"Kernels: fused = {named[kernel_sets[0]]}"
    if len(kernel_sets) > 1:
        text += (f"; fused next = {named[kernel_sets[1]]}, timed in a second process (the switch is read once per "
                 f"process), fused only, its bound from the first process's row")
    return text + ".\n"


COMPILED_NOTE = ("; compiled = torch.compile(reference) (default mode, static shapes, a dynamo reset per case), "
                 "timed after its compilation ('-' for a case not compiled)")


def _peak_note(rows):
    if not any("fused_peak" in r for r in rows):
        return "Peak memory: not measured (--no-peak).\n"
    return (f"Peak memory: {peak.METHOD}. Returned MiB: the output and (forward+backward) gradient the call "
            f"hands back, which no peak may be below: such an entry is measured again, up to {PEAK_ATTEMPTS} times "
            f"in all, and a '!' marks one that stays below. Memory ratios floor the fused peak at 1 MiB.\n")


def _capped_rounds(rows, repeat):
    """' (2 for skd pool1)' for the cases whose slow reference caps their rounds below `repeat`."""
    capped = sorted({(r["rounds"], r["case"]) for r in rows if r.get("rounds") and r["rounds"] < repeat})
    return f" ({', '.join(f'{n} for {case}' for n, case in capped)})" if capped else ""


def header(device, repeat, compiled, rates, rows, out, allocator=common.SYSTEM_MALLOC_NOTE, kernel_sets=None):
    if device.startswith("cuda"):
        dev = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        dev = f"{common.cpu_model()}, {torch.get_num_threads()} threads, torch CPU capability " \
              f"{torch.backends.cpu.get_cpu_capability()}, idd_ops CPU kernels {torch.ops.idd_ops._cpu_capability()}"
    train_step = TRAIN_STEP["cuda" if device.startswith("cuda") else "cpu"]
    link = os.path.relpath(train_step, os.path.dirname(os.path.abspath(out)))
    peers = ""
    if any("peer_name" in r for r in rows):
        peers = ("Peer: torch_scatter.scatter_mean for class_centroids (labels resized by index); \"not installed\" "
                 "where `import torch_scatter` fails: it has no wheels on PyPI; install a prebuilt wheel matching "
                 "your torch from https://data.pyg.org/whl/ (`pip install torch_scatter -f "
                 "https://data.pyg.org/whl/torch-<version>+<cpu|cuXXX>.html`) or build it "
                 "(`pip install torch_scatter --no-build-isolation`, a long C++ build).\n")
    return (f"Revision: {common.revision()}. Device: {device} ({dev}), torch {torch.__version__}, "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, float32. IDD: euclidean, "
            f"reduction=mean, street-layout labels unless the shape says fragmented (per-pixel random classes "
            f"at feature resolution). Position loss: maps {', '.join(cases.POSITION_KINDS)}.\n"
            f"Allocator: {allocator}.\n{kernels_note(kernel_sets)}"
            f"Times: the best of {repeat} rounds{_capped_rounds(rows, repeat)}; other tenants of the machine only "
            f"ever add time, "
            f"so the least is the most repeatable; implementations and the copy probe alternating"
            f"{COMPILED_NOTE if compiled else ''}.\n"
            f"{LAUNCH_NOTE if any('fused_host_ms' in r for r in rows) else ''}"
            f"{_peak_note(rows)}"
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


def compact_table(rows):
    """One short table of the key numbers: fused (default kernels), fused (next), eager
    reference, torch.compile(reference), bound, and host time and launches where measured."""
    nxt = any(r.get("fused_next_ms") is not None for r in rows)
    graphs = any(r.get(k) is not None for r in rows for k in ("fused_graph_ms", "fused_next_graph_ms"))
    head = ["row", "pass", "fused ms"] + (["fused next ms"] if nxt else []) + \
        ["eager reference ms", "compile(reference) ms", "bound ms", "fused / bound"] + \
        (["next / bound"] if nxt else []) + ["host ms/call", "launches/call"] + \
        (["next host ms/call", "next launches/call"] if nxt else []) + ["torch floor host ms/call"] + \
        ((["graph ms"] + (["next graph ms"] if nxt else [])) if graphs else [])
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r["case"], r["mode"], _ms_cell(r, "fused_ms", 3)] + ([_ms_cell(r, "fused_next_ms", 3)] if nxt else [])
        cells += [_ms_cell(r, "reference_ms", 3), _ms_cell(r, "compiled_ms", 3), _ms_cell(r, "bound_ms", 3),
                  _ratio2(r["fused_ms"], r.get("bound_ms"))] + ([_ratio2(r.get("fused_next_ms"), r.get("bound_ms"))]
                                                                 if nxt else [])
        cells += [_ms_cell(r, "fused_host_ms", 3), _ms_cell(r, "fused_launches", 1)]
        cells += [_ms_cell(r, "fused_next_host_ms", 3), _ms_cell(r, "fused_next_launches", 1)] if nxt else []
        cells += [_ms_cell(r, "floor_host_ms", 3)]
        if graphs:
            cells += [_ms_cell(r, "fused_graph_ms", 3)] + ([_ms_cell(r, "fused_next_graph_ms", 3)] if nxt else [])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def merge_kernel_sets(base_rows, next_rows):
    """base_rows with each matching next row's fused numbers as fused_next_* columns."""
    by_key = {(r["case"], r["mode"]): r for r in next_rows}
    merged = []
    for row in base_rows:
        other = by_key.get((row["case"], row["mode"]), {})
        extra = {"fused_next" + key[len("fused"):]: value for key, value in other.items()
                 if key.startswith("fused_") and key != "fused_returned"}
        merged.append(dict(row, **extra))
    return merged


def summary_section(rows, misses, columns, errors=()):
    """The GPU check's summary of this stage: the compact table and every target missed."""
    guard = targets.guard_failures(misses)
    lines = ["## perf: key rows\n", compact_table(rows)]
    for col in columns:
        mine = [m for m in misses if f"[{targets._label(col)}]" in m]
        lines.append(f"- {targets._label(col)}: {len(targets.guard_failures(mine))} guard failures (slower than "
                     f"the eager reference), {len(mine)} targets missed in all")
    lines += [f"- ERROR: {e}" for e in errors]
    if misses:
        lines.append(f"\n### Targets missed ({len(misses)}; guard failures: {len(guard)})\n")
        lines += [f"- {m}" for m in misses]
    predictions = kernel_predictions.misses(rows)
    if predictions:  # not targets: what a prediction got wrong, to look back on
        lines.append(f"\n### Kernel predictions missed ({len(predictions)}; benchmarks/kernel_predictions.py)\n")
        lines += [f"- {m}" for m in predictions]
    return "\n".join(lines) + "\n"
