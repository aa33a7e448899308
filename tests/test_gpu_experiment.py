"""The GPU session's other scripts, run here on the CPU with stand-ins for the GPU machine:
tools/gpu_experiment.sh (the tuning where none is committed, then the full preset, stopped at its
limit and picked up by a later call) and tools/cuda_library.sh (the prebuilt library, else a
build)."""
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from test_gpu_check import ROOT, _ends, _kill_all, _stand_in, _stand_in_pid


EXPERIMENT = os.path.join(ROOT, "tools", "gpu_experiment.sh")
SMALL = {"PRESET": "quick", "DEVICE": "cpu", "RUN_ARGS": "--configs ce ce+idd --seeds 0 --student-steps 2 "
         "--teacher-steps 2", "TUNE_ARGS": "--grid idd=1 --seeds 0 --student-steps 2 --teacher-steps 2"}


def _experiment(tmp_path, **env):
    env = dict(os.environ, OUT=str(tmp_path / "out"), RESULTS=str(tmp_path / "results"), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", **SMALL, **env)
    return subprocess.run(["bash", EXPERIMENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_experiment_tunes_then_runs_with_the_tuned_teacher(tmp_path):
    """tools/gpu_experiment.sh end to end at a few steps on the CPU: the tuning (RETUNE=1: again,
    over a finished one), then the preset with the tuning's teacher; one archive without
    checkpoints, the teacher beside it. A shared run file that a killed call left behind is
    removed first."""
    pytest.importorskip("matplotlib")  # the preset draws its plots
    leftover = tmp_path / "results" / "quick" / "runs" / "shared-1-2.pt"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * 1000)
    tuned = tmp_path / "results" / "quick-tune"
    tuned.mkdir(parents=True)
    (tuned / "tune.json").write_text('{"chosen": {"idd": 0.5}, "preset": {"size": [64, 128]}}')
    proc = _experiment(tmp_path, RETUNE="1")
    assert not leftover.exists()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["results.tar.gz", "summary.md", "teacher.pt"]
    summary = (out / "summary.md").read_text()
    assert re.search(r"\| tune \| passed \| \d+ \| 180 \|", summary)
    assert re.search(r"\| run \| passed \| \d+ \| 240 \|", summary)
    assert "Chosen weights" in summary and "## Per-class IoU" in summary  # tune.md and results.md
    assert json.loads((tuned / "tune.json").read_text())["chosen"] == {"idd": 1.0}  # the new tuning's grid
    run_log = (tmp_path / "results" / "quick" / "run.log").read_text()
    assert "cache: using the teacher in " + str(tmp_path / "results" / "quick-tune" / "teacher.pt") in run_log
    with tarfile.open(out / "results.tar.gz") as tar:
        names = [n for n in tar.getnames() if not n.endswith("/")]
    assert not any(n.endswith(".pt") for n in names)
    assert any(n.endswith("quick-tune/tune.json") for n in names) and any(n.endswith("quick/results.md") for n in names)


def test_gpu_experiment_takes_a_finished_tuning_and_trains_its_own_teacher(tmp_path):
    """A tuning committed from another machine (its tune.json, no teacher: git ignores
    checkpoints) is not redone; the preset trains its own teacher. (RETUNE=1 tunes again:
    test_gpu_experiment_tunes_then_runs_with_the_tuned_teacher.)"""
    pytest.importorskip("matplotlib")  # the preset draws its plots
    tuned = tmp_path / "results" / "quick-tune"
    tuned.mkdir(parents=True)
    (tuned / "tune.json").write_text('{"chosen": {"idd": 0.5}, "preset": {"size": [64, 128]}}')
    proc = _experiment(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| tune | skipped: " + str(tuned / "tune.json") + " exists (RETUNE=1 tunes again) | 0 | - |" in summary
    assert re.search(r"\| run \| passed \| \d+ \| 240 \|", summary)
    assert f"at 64x128 ({tuned / 'tune.json'}): {{'idd': 0.5}}" in summary  # its weights, not the preset's
    run_log = (tmp_path / "results" / "quick" / "run.log").read_text()
    assert "using the teacher in" not in run_log and "teacher: 2/2" in run_log
    assert not (tuned / "teacher.pt").exists() and not (tmp_path / "out" / "teacher.pt").exists()


def test_gpu_experiment_stops_at_its_limit_and_leaves_the_run_for_a_later_call(tmp_path):
    proc = _experiment(tmp_path, TUNE_S="1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| tune | FAILED, rc 124 (time limit: resume in the next call) |" in summary
    assert "| run | not run: the tuning did not finish |" in summary


EXPERIMENT_STAND_IN = """#!{python}
# the tuning's python: leaves a teacher in its output folder, then runs until a KILL stops it (it
# ignores TERM, as a run that is saving may take its time)
import os, signal, sys, time
args = sys.argv[1:]
if args[:2] == ["-m", "idd_ops.demo.tune"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = args[args.index("--out") + 1]
    open(os.path.join(out, "teacher.pt"), "w").write("teacher")
    with open(os.environ["STAND_IN_PIDS"], "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(60)
sys.exit(1)
"""


def test_gpu_experiment_stopped_by_a_signal_brings_back_the_step_and_the_teacher(tmp_path):
    """The device tool's limit stops the call in its tuning: the tuning's command stops too (its
    timeout process leads a process group of its own; KILLed 5 s after a TERM it ignores), the
    summary names the step once (a second signal comes while the first is handled), and the
    teacher the tuning had trained comes back for the next call."""
    pids = tmp_path / "pids"
    fake = _stand_in(tmp_path / "python", EXPERIMENT_STAND_IN.format(python=sys.executable))
    env = dict(os.environ, OUT=str(tmp_path / "out"), RESULTS=str(tmp_path / "results"), PYTHON=str(fake),
               STAND_IN_PIDS=str(pids), **SMALL)
    proc = subprocess.Popen(["bash", EXPERIMENT], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        tune = _stand_in_pid(pids)  # the tuning's command has started
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # while the first waits for the step to end
        assert proc.wait(timeout=30) == 130
        summary = (tmp_path / "out" / "summary.md").read_text()
        rows = re.findall(r"\| tune \| stopped by a signal \(resume in the next call\) \| \d+ \| - \|", summary)
        assert len(rows) == 1, summary
        assert (tmp_path / "out" / "teacher.pt").read_text() == "teacher"
        assert _ends(tune)
    finally:
        proc.kill()
        _kill_all([pids])


FAKE_PYTHON = """#!/usr/bin/env python3
# stands in for the GPU machine's python in tools/cuda_library.sh: FAKE_USE (prebuilt_cuda.py use's
# exit status), FAKE_RUNS (the kernel check's exit status per call, comma-separated), FAKE_BUILD
import os, sys
log = open(os.environ["FAKE_LOG"], "a")
args = sys.argv[1:]
if args[:2] == ["tools/prebuilt_cuda.py", "use"]:
    log.write("use\\n"); sys.exit(int(os.environ["FAKE_USE"]))
if args[:2] == ["tools/prebuilt_cuda.py", "built"]:
    log.write("record\\n"); sys.exit(0)
if args[:1] == ["-"]:
    sys.stdin.read()
    runs = os.environ["FAKE_RUNS"].split(",")
    done = sum(1 for line in open(os.environ["FAKE_LOG"]) if line.startswith("run"))
    log.write("run\\n"); sys.exit(int(runs[done]))
if args[:2] == ["setup.py", "build_ext"]:
    log.write("build\\n"); sys.exit(int(os.environ["FAKE_BUILD"]))
sys.exit(f"unexpected call: {args}")
"""


@pytest.mark.parametrize("use, runs, build, calls, rc", [
    ("0", "0", "0", ["use", "run", "record"], 0),  # the prebuilt library fits and runs
    ("3", "0", "0", ["use", "build", "run", "record"], 0),  # it does not fit: built
    ("0", "1,0", "0", ["use", "run", "build", "run", "record"], 0),  # it fits but does not run: built
    ("3", "1", "0", ["use", "build", "run"], 1),  # the build does not run either: no record
    ("3", "0", "1", ["use", "build"], 1),  # the build fails
])
def test_cuda_library_takes_the_prebuilt_library_else_builds(tmp_path, use, runs, build, calls, rc):
    fake = _stand_in(tmp_path / "python", FAKE_PYTHON)
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(tmp_path / "calls"), FAKE_USE=use, FAKE_RUNS=runs,
               FAKE_BUILD=build)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "cuda_library.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert (tmp_path / "calls").read_text().split() == calls
    assert ("building the CUDA library here" in proc.stdout) == ("build" in calls)
