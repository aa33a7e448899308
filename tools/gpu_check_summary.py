"""The one summary file of tools/gpu_check.sh, from what its stages left in the logs folder:

    python tools/gpu_check_summary.py LOGS_DIR SUMMARY_MD [SECONDS_SO_FAR]

LOGS_DIR holds, per stage NAME (in the order of LOGS_DIR/stages): NAME.status ("rc seconds
limit", rc "dry" in a dry run), NAME.log, NAME.cmd; and where the stage made them: tests.jsonl and
tests-next.jsonl (tests/result_log.py's per-test lines, written as the tests finish), else
tests.xml and tests-next.xml (pytest's junit, written only by a run that finished),
perf.section.md, train.section.md, demo-results.md. The summary: the stage table, the test counts,
failures (with how each ended) and slowest tests of each kernel set, the perf and training-step
sections, the demo's results and the last lines of every failed stage's log.
"""
import json
import os
import sys
import xml.etree.ElementTree as ET

PREBUILT_USED = "prebuilt CUDA library installed"  # tools/prebuilt_cuda.py use's line when it fits
PREBUILT_NOT_USED = "prebuilt CUDA library not used: "  # and when it does not, with why
BUILT_THERE = "building the CUDA library here"  # tools/cuda_library.sh's line before it builds
TAIL_LINES = 25
MAX_FAILURES = 40
SLOWEST = 10


def info_field(info, key, default):
    """The value of check.info's `key`=... field, `default` where the line has none."""
    return next((w[len(key) + 1:] for w in info.split() if w.startswith(key + "=")), default)


def checks_next(info):
    """Whether the check ran the next kernel set too: check.info's kernels=... field (gpu_check.sh's
    KERNELS, comma-separated: "default", or "default,next" while GPU code is behind
    IDD_OPS_CUDA_NEXT)."""
    return "next" in info_field(info, "kernels", "default").split(",")


def next_set(info):
    """The next set's IDD_OPS_CUDA_NEXT: check.info's next=... field (gpu_check.sh's
    IDD_OPS_NEXT_SET), "1" where the field is missing."""
    return info_field(info, "next", "1")


def stage_kernels(with_next, next_value="1"):
    """Each stage's kernel set."""
    named = f"IDD_OPS_CUDA_NEXT={next_value}"
    newest, each = (named, "both") if with_next else ("default", "default")
    return {"tests": "default", "tests-next": named, "demo": newest, "perf": each, "train": each}


def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def build_how(log):
    """' (prebuilt library)', ' (built there: why)' or '' from the build stage's log."""
    if BUILT_THERE in log:
        reasons = [line[len(PREBUILT_NOT_USED):] for line in log.splitlines() if line.startswith(PREBUILT_NOT_USED)]
        why = reasons[0] if reasons else "the prebuilt library did not run a kernel"
        return f" (built there: {why})"
    return " (prebuilt library)" if PREBUILT_USED in log else ""


def stage_rows(logs):
    """[(name, status text, seconds, limit, failed)] in the order the stages ran."""
    names = list(dict.fromkeys(read(os.path.join(logs, "stages")).split()))
    rows = []
    for name in names:
        fields = read(os.path.join(logs, name + ".status")).split()
        if len(fields) != 3:
            rows.append((name, "did not finish (running when this summary was written)", "-", "-", True))
            continue
        rc, secs, limit = fields
        if rc == "dry":
            rows.append((name, "dry run: not run", "-", limit, False))
        elif rc == "0":
            how = build_how(read(os.path.join(logs, "build.log"))) if name == "build" else ""
            rows.append((name, f"passed{how}", secs, limit, False))
        else:
            why = " (time limit)" if rc in ("124", "137") else ""
            rows.append((name, f"FAILED, rc {rc}{why}", secs, limit, True))
    return rows


def junit_summary(path):
    """(one line of counts, [failed test ids]) of a pytest junit file, or None if absent/unreadable."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        return f"unreadable junit file ({error})", []
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    secs = sum(float(s.get("time", 0)) for s in suites)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    line = (f"{passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped "
            f"in {secs:.0f} s")
    return line, failed


def read_result_log(text):
    """(tests collected or None, [result records]) of a per-test log's text (tests/result_log.py)."""
    collected, results = None, []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the time limit
        if not isinstance(record, dict):
            continue
        if "collected" in record:
            collected = record["collected"]
        elif "test" in record:
            results.append(dict(record, outcome=record.get("outcome", "?"), seconds=record.get("seconds") or 0))
    return collected, results


def result_log_summary(path, stage=None):
    """[markdown lines] from a per-test log (tests/result_log.py), or None if absent: the counts
    (of how many collected), each failure with the end of its report, the slowest tests; with
    the log's stage named, how to run again what failed or did not run (tools/gpu_rerun.py)."""
    if not os.path.exists(path):
        return None
    collected, results = read_result_log(read(path))
    kinds = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    count = {k: sum(r["outcome"] == k for r in results) for k in kinds}
    ran = sum(1 for r in results if r["outcome"] != "error")
    secs = sum(r["seconds"] for r in results)
    of = f" of {collected} collected" if collected is not None else ""
    head = (f"{ran}{of} ran: {count['passed']} passed, {count['failed']} failed, {count['error']} errors, "
            f"{count['skipped']} skipped, {count['xfailed']} xfailed, {count['xpassed']} xpassed; "
            f"{secs:.0f} s of test time across the workers")
    out = [head]
    bad = [r for r in results if r["outcome"] in ("failed", "error", "xpassed")]  # xpassed: a known defect gone
    if stage and (bad or (collected is not None and ran < collected)):
        out += ["", f"To run again what failed or did not run: `python tools/gpu_rerun.py logs.tar.gz --stage {stage}` "
                "here (writes gpu-rerun.txt for GPU_TESTS_FILE).", ""]
    for r in bad[:MAX_FAILURES]:
        out += [f"- {r['outcome'].upper()} {r['test']} ({r['seconds']:.1f} s)"]
        message = str(r.get("message") or "").strip()
        if message:
            out += ["  ```", *[f"  {m}" for m in message.splitlines()], "  ```"]
    if len(bad) > MAX_FAILURES:
        out.append(f"- ... {len(bad) - MAX_FAILURES} more")
    slow = sorted((r for r in results if r["outcome"] != "skipped"), key=lambda r: -r["seconds"])[:SLOWEST]
    if slow:
        out += ["", f"Slowest {len(slow)}: " + "; ".join(f"{r['test']} {r['seconds']:.1f} s" for r in slow)]
    return out


def tail(path, n=TAIL_LINES):
    lines = read(path).rstrip("\n").splitlines()
    return "\n".join(lines[-n:])


def summary(logs, elapsed=None):
    info = read(os.path.join(logs, "check.info")).strip()
    kernels = stage_kernels(checks_next(info), next_set(info))
    out = [f"# GPU check ({info})" + (f", {elapsed} s in all" if elapsed is not None else ""), ""]
    stopped = read(os.path.join(logs, "stopped")).strip()
    if stopped:  # on_signal: the device tool's time limit, most likely
        out += [f"**The check was {stopped}**: the stages that did not finish were running.", ""]
    out += ["| stage | kernels | status | s | limit s |", "|---|---|---|---:|---:|"]
    rows = stage_rows(logs)
    for name, status, secs, limit, _ in rows:
        out.append(f"| {name} | {kernels.get(name, '-')} | {status} | {secs} | {limit} |")
    problems = read(os.path.join(logs, "dry-run.problems")).strip()
    if problems:
        out += ["", "Dry-run problems:", "", *[f"- {p}" for p in problems.splitlines()]]
    for name in ("tests", "tests-next"):
        log = result_log_summary(os.path.join(logs, name + ".jsonl"), stage=name)
        if log:
            out += ["", f"## {name} ({kernels[name]} kernels): {log[0]}", *log[1:]]
            continue
        result = junit_summary(os.path.join(logs, name + ".xml"))
        if result:
            line, failed = result
            out += ["", f"## {name} ({kernels[name]} kernels): {line}"]
            out += [f"- FAILED {t}" for t in failed[:MAX_FAILURES]]
            out += [f"- ... {len(failed) - MAX_FAILURES} more"] if len(failed) > MAX_FAILURES else []
    for section in ("perf.section.md", "train.section.md"):
        text = read(os.path.join(logs, section)).strip()
        if text:
            out += ["", text]
    demo = read(os.path.join(logs, "demo-results.md")).strip()
    if demo:
        out += ["", "## demo (quick preset) results.md, first lines", "", *demo.splitlines()[:15]]
    for name, status, _, _, failed in rows:
        if failed:
            out += ["", f"## {name}: {status}; last {TAIL_LINES} lines of its log", "", "```",
                    tail(os.path.join(logs, name + ".log")), "```"]
    return "\n".join(out) + "\n"


def main(argv):
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    logs, dest = argv[0], argv[1]
    elapsed = int(argv[2]) if len(argv) > 2 else None
    text = summary(logs, elapsed)
    with open(dest, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
