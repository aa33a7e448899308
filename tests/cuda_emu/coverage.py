"""Which lines of the CUDA sources the emulated tests run: line and branch coverage of csrc/cuda
(and the csrc/common headers the kernels include) under the CPU emulator, from gcov.

    python -m tests.cuda_emu.coverage                  # the emulated test files, each kernel set
    python -m tests.cuda_emu.coverage --out /tmp/c.md -- tests/test_cuda_emulated_sums.py -k backward
                                                       # pytest arguments after --, instead of those files

It builds the emulator a second time, unoptimised and with gcov's instrumentation
(IDD_OPS_EMU_COVERAGE=1, in build/cuda_emu-coverage; the translation keeps every source line's
number), runs the tests in a child pytest (which also runs the public API's test files through
both emulated kernel sets) and writes tests/cuda_emu/COVERAGE.md: per source the device lines run,
the device branches taken and the host lines run, then every device line or branch and every
template instance that no test reaches, with its text. Device code is the __global__, __device__
and C10_HOST_DEVICE functions; the exception edges of calls (which only a throw takes) are not
counted as branches.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from . import build

ROOT = build.ROOT
TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_cuda_emulated*.py"))
OUT = Path(__file__).resolve().parent / "COVERAGE.md"
# build/cuda_emu-coverage/src/<folder>/<name> -> the source it was translated from
FOLDERS = {"cuda": "csrc/cuda", "common": "csrc/common"}


def source_of(path, translated):
    """The csrc path of a file gcov names, translated under `translated`, or None for files outside
    the report."""
    try:
        rel = Path(path).resolve().relative_to(translated)
    except ValueError:
        return None
    folder = FOLDERS.get(rel.parts[0]) if len(rel.parts) == 2 else None
    if folder is None:
        return None
    name = rel.name[:-4] + ".cu" if rel.parts[0] == "cuda" and rel.suffix == ".cpp" else rel.name
    return f"{folder}/{name}" if (ROOT / folder / name).exists() else None


def collect(build_dir):
    """{source: (lines, instances)} over every .gcda of the build. lines: {line: [count, arcs]},
    the count summed over template and inlined instances, arcs {number of arcs: arcs taken} over
    the instances that ran (an instance never run is listed once, not as untaken branches);
    instances: {(first line, name): ran}."""
    seen = defaultdict(lambda: (defaultdict(lambda: [0, defaultdict(set)]), defaultdict(bool)))
    for gcda in sorted(build_dir.glob("*.gcda")):
        out = subprocess.run(["gcov", "--json-format", "--stdout", "--branch-probabilities", str(gcda)],
                             cwd=build_dir, capture_output=True, text=True, check=True).stdout
        for doc in out.splitlines():  # one JSON document per object file
            if not doc.strip():
                continue
            for f in json.loads(doc)["files"]:
                src = source_of(build_dir / f["file"], build_dir / "src")  # an absolute path stays
                if src is None:
                    continue
                lines, instances = seen[src]
                ran = {}
                for fn in f["functions"]:
                    ran[fn["name"]] = fn["execution_count"] > 0
                    instances[fn["start_line"], fn["demangled_name"]] |= ran[fn["name"]]
                for rec in f["lines"]:
                    entry = lines[rec["line_number"]]
                    entry[0] += rec["count"]
                    if ran.get(rec.get("function_name"), rec["count"] > 0):
                        arcs = [b for b in rec["branches"] if not b["throw"]]
                        entry[1][len(arcs)].update(i for i, b in enumerate(arcs) if b["count"] > 0)
    return seen


def device_lines(text):
    """Line numbers of the __global__, __device__ and C10_HOST_DEVICE functions of a source, from
    the declaration to the closing brace."""
    lines = set()
    for m in re.finditer(r"(__global__|__device__|C10_HOST_DEVICE)[^;{]*\{", text):
        open_at = m.end() - 1
        close = build._matching(text, open_at, "{", "}")
        lines.update(range(text.count("\n", 0, m.start()) + 1, text.count("\n", 0, close) + 2))
    return lines


def ranges(numbers):
    """[1, 2, 3, 7] -> [(1, 3), (7, 7)]"""
    out = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [tuple(r) for r in out]


def _pct(a, b):
    return f"{a} / {b} ({100 * a / b:.0f} %)" if b else "-"


def report(seen, command):
    rows, details, total = [], [], [0] * 6
    for src in sorted(seen):
        lines, instances = seen[src]
        text = (ROOT / src).read_text()
        source = text.splitlines()
        device = device_lines(text)
        arcs = {n: (max(a), len(a[max(a)])) if a else (0, 0) for n, (_, a) in lines.items()}
        dev = [n for n in lines if n in device]
        host = [n for n in lines if n not in device]
        counts = (sum(lines[n][0] > 0 for n in dev), len(dev), sum(arcs[n][1] for n in dev if lines[n][0] > 0),
                  sum(arcs[n][0] for n in dev), sum(lines[n][0] > 0 for n in host), len(host))
        total = [t + c for t, c in zip(total, counts)]
        unrun = sorted({(line, name) for (line, name), ran in instances.items() if not ran and line in device})
        rows.append(f"| {src} | {_pct(*counts[0:2])} | {_pct(*counts[2:4])} | {_pct(*counts[4:6])} | {len(unrun)} |")
        item = []
        for where, numbers in (("device", dev), ("host", host)):
            for a, b in ranges(n for n in numbers if lines[n][0] == 0):
                item.append(f"- {where} line{'s' if b > a else ''} never run, {a}" + (f"-{b}" if b > a else "")
                            + f": `{source[a - 1].strip()[:90]}`")
        for n in sorted(n for n in dev if lines[n][0] > 0 and arcs[n][1] < arcs[n][0]):
            item.append(f"- device branch never taken, {n} ({arcs[n][1]} of {arcs[n][0]} arcs): "
                        f"`{source[n - 1].strip()[:90]}`")
        for line, name in unrun:
            item.append(f"- instance never run, {line}: `{name}`")
        if item:
            details += [f"\n### {src}\n", *item]
    head = [
        "# CUDA sources run by the emulated tests",
        "",
        "Generated by `python -m tests.cuda_emu.coverage`: gcov over an unoptimised (-O0) build of",
        "the emulator (tests/cuda_emu), each kernel set. Device code is the `__global__`, `__device__`",
        "and `C10_HOST_DEVICE` functions, host code the rest; a host line's branches are mostly torch's",
        "inlined checks, so only host lines are counted. A line counts as run when any template",
        "instance of it ran, a branch as taken when an instance that ran took it (exception edges",
        "left out); a template instance no test ran is listed once, by name. The emulator runs every",
        "thread of every block, so a branch listed below is one no test input reaches, not one a",
        "schedule missed. What only a GPU shows (timing, caches, its own rounding) is outside this.",
        "",
        f"Tests: `{command}`, at {build.source_revision('csrc')}.",
        "",
        "| source | device lines run | device branches taken | host lines run | instances never run |",
        "|---|---:|---:|---:|---:|",
        *rows,
        f"| all | {_pct(*total[0:2])} | {_pct(*total[2:4])} | {_pct(*total[4:6])} | |",
        "",
        "## What no emulated test reaches",
    ]
    return "\n".join(head + details) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workers", default="2", help="pytest-xdist workers (0: none)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest instead of the emulated test files")
    args = parser.parse_args(argv)
    env = dict(os.environ, IDD_OPS_EMU_COVERAGE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    coverage_dir = build.COVERAGE_BUILD
    # build once before the workers start, then clear the counts of earlier runs
    subprocess.run([sys.executable, "-m", "tests.cuda_emu.build"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    for gcda in coverage_dir.glob("*.gcda"):
        gcda.unlink()
    tests = args.pytest_args or TESTS
    command = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    if args.workers != "0":
        command += ["-n", args.workers]
    shown = "python " + shlex.join(command)
    print(shown, flush=True)
    failed = subprocess.run([sys.executable, *command], cwd=ROOT, env=env).returncode
    args.out.write_text(report(collect(coverage_dir), shown.replace(str(ROOT) + "/", "")))
    print(f"written to {args.out}" + (f" (pytest exit status {failed})" if failed else ""))
    return failed


if __name__ == "__main__":
    sys.exit(main())
