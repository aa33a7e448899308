"""The GPU tests a check's test stage left to run again: those that failed, erred or never ran
before its time limit, one id a line, for the next call's test stage.

    python tools/gpu_rerun.py LOGS [--stage tests|tests-next] [--out gpu-rerun.txt]

(--stage: default tests-next where the check ran it, else tests.)

LOGS: the logs folder of tools/gpu_check.sh, or the logs.tar.gz a device call brought back. The
stage's own arguments (STAGE.cmd) are collected here (`pytest --collect-only -m gpu`: the ids do
not depend on a GPU being present), and every id its per-test log (STAGE.jsonl) does not show as
passed, skipped or xfailed is written out. The file is git-ignored: the device tool takes it with
`carry: [".prebuilt-cuda", "gpu-rerun.txt"]`, and `GPU_TESTS_FILE=gpu-rerun.txt bash
tools/gpu_check.sh --only STAGE` runs it (hundreds of ids do not fit a 2000-character command,
as GPU_TESTS would need).
"""
import argparse
import os
import shlex
import subprocess
import sys
import tarfile

from gpu_check_summary import read_result_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = ("passed", "skipped", "xfailed")


def stage_file(logs, name):
    """The text of file `name` of a logs folder or tarball ('' where absent)."""
    if os.path.isdir(logs):
        path = os.path.join(logs, name)
        return open(path).read() if os.path.exists(path) else ""
    with tarfile.open(logs) as tar:
        for member in ("./" + name, name):
            try:
                return tar.extractfile(member).read().decode()
            except KeyError:
                continue
    return ""


def stage_paths(cmd):
    """The test paths and ids among a stage's command line (STAGE.cmd: printf %q words)."""
    return [a for a in shlex.split(cmd) if a.startswith("tests/")]


def collect(paths, python=sys.executable):
    """The GPU test ids the paths hold, in pytest's order."""
    proc = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           *paths], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"gpu_rerun: collecting the stage's tests failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return [line for line in proc.stdout.splitlines() if "::" in line]


def left_to_run(collected, results):
    """The ids of `collected` without a result in DONE, or with any other (failed, error, xpassed:
    a teardown error after a pass counts)."""
    done = {r["test"] for r in results if r["outcome"] in DONE}
    bad = {r["test"] for r in results if r["outcome"] not in DONE}
    return [t for t in collected if t not in done or t in bad]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", help="the logs folder, or logs.tar.gz")
    p.add_argument("--stage", choices=("tests", "tests-next"))
    p.add_argument("--out", default=os.path.join(ROOT, "gpu-rerun.txt"))
    args = p.parse_args(argv)
    if args.stage is None:
        args.stage = "tests-next" if stage_file(args.logs, "tests-next.cmd") else "tests"
    cmd = stage_file(args.logs, f"{args.stage}.cmd")
    if not cmd:
        sys.exit(f"gpu_rerun: {args.logs} has no {args.stage}.cmd: did the stage run?")
    _, results = read_result_log(stage_file(args.logs, f"{args.stage}.jsonl"))
    left = left_to_run(collect(stage_paths(cmd)), results)
    ran = len({r["test"] for r in results})
    if not left:
        print(f"nothing left to run: every test of {args.stage} passed, skipped or xfailed ({ran} results)")
        return
    with open(args.out, "w") as f:
        f.write("".join(t + "\n" for t in left))
    kernels = " KERNELS='default next'" if args.stage == "tests-next" else ""
    print(f"{len(left)} tests left to run ({ran} have results in the log) in {args.out}; the call: "
          f"GPU_TESTS_FILE={os.path.relpath(args.out, ROOT)}{kernels} bash tools/gpu_check.sh --only {args.stage}, "
          f"carry [\".prebuilt-cuda\", \"{os.path.relpath(args.out, ROOT)}\"]")


if __name__ == "__main__":
    main()
