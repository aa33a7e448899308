"""The one-call GPU check (tools/gpu_check.sh) is known to work before a GPU is available: its
dry run checks every stage's prerequisites and collects the GPU tests; its options, its time
budget and its summary (tools/gpu_check_summary.py) are checked here too."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
STAGES = ("env", "build", "tests", "tests-next", "demo", "perf", "train")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_check_summary  # noqa: E402
from idd_ops._switches import NEXT_GROUPS  # noqa: E402
from conftest import SLOW_WORDS  # noqa: E402


def _env(tmp_path, **extra):
    # PYTHON: the script's interpreter is this one (its default, python3 on PATH, may be another
    # environment's, with another torch)
    # KERNELS: one set unless a test names two (the script's default names both while code is behind
    # IDD_OPS_CUDA_NEXT)
    return {**os.environ, "OUT": str(tmp_path / "out"), "LOGS": str(tmp_path / "logs"), "PYTHON": sys.executable,
            "KERNELS": "default", **extra}


def _run(tmp_path, *args, timeout=300, env=None):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=_env(tmp_path, **(env or {})), capture_output=True,
                          text=True, timeout=timeout)


def _stand_in(path, text):
    """An executable stand-in for the GPU machine's python."""
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_gpu_check_dry_run(tmp_path):
    proc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.md"]  # the device tool brings back 8 files at most
    summary = (out / "summary.md").read_text()
    stages = [s for s in STAGES if s != "tests-next"]  # KERNELS=default (_env): one set
    for stage in stages:
        assert f"| {stage} |" in summary and "dry run: not run" in summary, stage
    assert "| tests-next |" not in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
        collected = {s: tar.extractfile(f"./{s}.collect.log").read().decode() for s in ("tests",)}
    assert {f"{s}.log" for s in stages} <= names and "targets.md" in names
    test_files = sorted(f"tests/{n}" for n in os.listdir(os.path.join(ROOT, "tests"))
                        if n.startswith("test_") and n.endswith(".py"))
    for name, text in collected.items():  # each test stage's own arguments: every test file, no glob left
        assert "[cuda" in text and "test_cuda_kernels_are_built_where_a_gpu_is_visible" in text, name
        args = (tmp_path / "logs" / f"{name}.cmd").read_text().split()
        assert sorted(a for a in args if a.startswith("tests/")) == test_files, name
    assert "--kernels default --time-limit" in (tmp_path / "logs" / "perf.cmd").read_text()
    assert "tools/cuda_library.sh" in (tmp_path / "logs" / "build.cmd").read_text()
    assert "prebuilt CUDA library" in proc.stdout  # whether the carried library fits these sources
    tests_cmd = (tmp_path / "logs" / "tests.cmd").read_text()
    assert "IDD_OPS_SLOW_FIRST=1" in tests_cmd and "--maxschedchunk 1" in tests_cmd  # pytest-xdist 3.3+ here
    assert "-n 10 " in tests_cmd  # the candidate set's workers


def test_a_next_kernel_set_adds_its_stage(tmp_path):
    """KERNELS="default next" (GPU code behind IDD_OPS_CUDA_NEXT): tests-next runs the GPU tests
    under IDD_OPS_CUDA_NEXT=1 with most workers beside tests, the demo takes the next set, and
    perf times both; without it, --only tests-next is refused."""
    proc = _run(tmp_path, "--dry-run", "--only", "tests-next,demo,perf", env=dict(KERNELS="default next"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = tmp_path / "logs"
    assert sorted(logs.joinpath("stages").read_text().split()) == ["demo", "perf", "tests-next"]
    assert "IDD_OPS_CUDA_NEXT=1" in logs.joinpath("tests-next.cmd").read_text()
    assert "-n 10 " in logs.joinpath("tests-next.cmd").read_text()
    assert "IDD_OPS_CUDA_NEXT=1" in logs.joinpath("demo.cmd").read_text()
    assert "--kernels default next" in logs.joinpath("perf.cmd").read_text()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| demo | IDD_OPS_CUDA_NEXT=1 |" in summary and "| perf | both |" in summary
    proc = _run(tmp_path / "refused", "--dry-run", "--only", "tests-next")
    assert proc.returncode == 2 and "KERNELS must name it" in proc.stderr


def test_the_next_set_can_be_some_of_its_groups(tmp_path):
    """IDD_OPS_NEXT_SET (csrc/common/next_groups.h's groups): the next set's value in its stages,
    the benchmarks' child processes and the summary; a group the switch does not know is refused
    before any stage runs."""
    # a value the switch reads whatever groups there are (names come and go with the switch-ons)
    env = dict(KERNELS="default next", IDD_OPS_NEXT_SET="0,all")
    proc = _run(tmp_path, "--dry-run", "--only", "tests-next,demo", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = tmp_path / "logs"
    for stage in ("tests-next", "demo"):  # the commands as the shell quotes them (printf %q)
        assert "IDD_OPS_CUDA_NEXT=0\\,all" in logs.joinpath(f"{stage}.cmd").read_text(), stage
    assert "next=0,all" in logs.joinpath("check.info").read_text()
    assert "| tests-next | IDD_OPS_CUDA_NEXT=0,all |" in (tmp_path / "out" / "summary.md").read_text()
    refused = ["all,-tail", "0, all"] + (["0", f"{NEXT_GROUPS[0]},-{NEXT_GROUPS[0]}"] if NEXT_GROUPS else [])
    for i, value in enumerate(refused):  # no such group, a space, no group at all
        proc = _run(tmp_path / f"refused{i}", "--dry-run", env=dict(KERNELS="default next", IDD_OPS_NEXT_SET=value))
        assert proc.returncode == 2 and f"IDD_OPS_NEXT_SET: '{value}' is no next set" in proc.stderr, value
        assert not (tmp_path / f"refused{i}" / "logs" / "stages").exists()
        assert ("unknown kernel group 'tail'" in proc.stderr) == (i == 0)  # the parser's own words


def test_only_and_skip_select_stages(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--only", "demo,perf", "--skip", "perf")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "logs" / "stages").read_text().split() == ["demo"]
    assert "IDD_OPS_CUDA_NEXT=0" in (tmp_path / "logs" / "demo.cmd").read_text()
    assert not (tmp_path / "logs" / "tests.collect.log").exists()  # the dry run checks the selected stages only


def test_gpu_tests_node_ids_are_collected_as_given_and_a_missing_one_fails_the_dry_run(tmp_path, monkeypatch):
    """GPU_TESTS (a rerun of what failed) reaches pytest unglobbed, and the dry run collects each
    test stage's own arguments, so a path pytest cannot find fails here rather than on the GPU."""
    node = "tests/test_centroids.py::test_matches_reference[cuda-dtype0-shape0]"
    monkeypatch.setenv("GPU_TESTS", f"{node} tests/test_cuda_runtime.py")
    proc = _run(tmp_path, "--dry-run", "--only", "tests")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    args = shlex.split((tmp_path / "logs" / "tests.cmd").read_text())
    assert args[-2:] == [node, "tests/test_cuda_runtime.py"]
    assert node in (tmp_path / "logs" / "tests.collect.log").read_text()
    monkeypatch.setenv("GPU_TESTS", "tests/test_no_such_file.py")
    proc = _run(tmp_path / "missing", "--dry-run", "--only", "tests")
    assert proc.returncode != 0
    assert "broken: tests" in (tmp_path / "missing" / "out" / "summary.md").read_text()


def test_gpu_tests_one_a_line_keep_their_spaces(tmp_path, monkeypatch):
    # GPU tests whose ids name no cuda parametrisation (a dry run once wanted "[cuda" among them)
    ids = ["tests/test_cuda_parity.py::test_benchmark_shape_matches_float64_reference[idd_loss cityscapes]",
           "tests/test_bad_input.py::test_mismatched_devices"]
    monkeypatch.setenv("GPU_TESTS", "\n".join(ids) + "\n")
    proc = _run(tmp_path, "--dry-run", "--only", "tests")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert shlex.split((tmp_path / "logs" / "tests.cmd").read_text())[-2:] == ids
    assert ids[0] in (tmp_path / "logs" / "tests.collect.log").read_text()


def test_perf_cases_one_a_line_and_an_unknown_one_fails_the_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PERF_CASES", "ifvd b2\nskd pool2 b2\n")
    proc = _run(tmp_path, "--dry-run", "--only", "perf")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    args = shlex.split((tmp_path / "logs" / "perf.cmd").read_text())
    assert args[args.index("--cases") + 1:args.index("--out")] == ["ifvd b2", "skd pool2 b2"]
    monkeypatch.setenv("PERF_CASES", "ifvd b2\nskd pool3")
    proc = _run(tmp_path / "bad", "--dry-run", "--only", "perf")
    assert proc.returncode != 0 and "unknown cases ['skd pool3']" in proc.stdout


def test_rerun_lists_what_a_stage_left_and_the_next_call_runs_it(tmp_path):
    """tools/gpu_rerun.py: from a stage's logs (a folder or the tarball a call brings back), the
    ids that failed or never ran; gpu_check.sh's GPU_TESTS_FILE runs them."""
    import gpu_rerun
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "tests-next.cmd").write_text("env IDD_OPS_CUDA_NEXT=1 python3 -m pytest -q -m gpu tests/test_centroids.py ")
    collected = gpu_rerun.collect(["tests/test_centroids.py"])
    assert len(collected) >= 4
    results = [dict(test=collected[0], outcome="passed"), dict(test=collected[1], outcome="failed"),
               dict(test=collected[2], outcome="skipped"), dict(test=collected[2], outcome="error")]
    (logs / "tests-next.jsonl").write_text(
        json.dumps({"collected": len(collected)}) + "\n" + "".join(json.dumps(r) + "\n" for r in results) + '{"test": ')
    with tarfile.open(tmp_path / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname=".")
    for source in (logs, tmp_path / "logs.tar.gz"):
        out = tmp_path / "rerun.txt"
        gpu_rerun.main([str(source), "--out", str(out)])
        assert out.read_text().splitlines() == collected[1:]  # failed, erred, never ran
    # the summary says how under each stage that left tests, naming it
    (logs / "check.info").write_text("2026-12-04T00:00:00Z dry=0 only=all skip=none kernels=default,next rev=abc\n")
    (logs / "stages").write_text("tests\ntests-next\n")
    (logs / "tests.jsonl").write_text((logs / "tests-next.jsonl").read_text())
    text = gpu_check_summary.summary(str(logs))
    assert text.count("python tools/gpu_rerun.py logs.tar.gz --stage ") == 2
    assert "--stage tests`" in text and "--stage tests-next`" in text
    assert "## tests-next (IDD_OPS_CUDA_NEXT=1 kernels)" in text
    passed = tmp_path / "passed"
    passed.mkdir()
    (passed / "tests-next.cmd").write_text("python3 -m pytest tests/test_centroids.py::" +
                                           collected[0].split("::", 1)[1].replace("[", "\\[").replace("]", "\\]"))
    (passed / "tests-next.jsonl").write_text(json.dumps(dict(test=collected[0], outcome="passed")) + "\n")
    gpu_rerun.main([str(passed), "--out", str(passed / "rerun.txt")])
    assert not (passed / "rerun.txt").exists()  # nothing left: no file to carry
    env = dict(GPU_TESTS_FILE=str(out))
    proc = _run(tmp_path / "check", "--dry-run", "--only", "tests", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    args = shlex.split((tmp_path / "check" / "logs" / "tests.cmd").read_text())
    assert args[args.index("--junitxml=" + str(tmp_path / "check" / "logs" / "tests.xml")) + 1:] == collected[1:]
    proc = _run(tmp_path / "missing", "--dry-run", env=dict(GPU_TESTS_FILE=str(tmp_path / "none.txt")))
    assert proc.returncode == 2 and "GPU_TESTS_FILE: no such file" in proc.stderr


STAND_IN = """#!{python}
# the GPU machine's python for a perf stage that runs until stopped; the summary runs for real
import os, sys, time
args = sys.argv[1:]
if args[:1] == ["tools/gpu_check_summary.py"]:
    os.execv(sys.executable, [sys.executable] + args)
if args[:2] == ["tools/prebuilt_cuda.py", "built"]:
    sys.exit(0)
if args[:2] == ["-m", "benchmarks.report"] and "--warm-compile" not in args:
    with open(os.environ["STAND_IN_PIDS"], "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(60)
sys.exit(1)
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"


def _stand_in_pid(pids):
    """The first process id a stand-in wrote to `pids` (waits up to 30 s for it to start)."""
    for _ in range(300):
        if pids.exists() and pids.read_text().strip():
            break
        time.sleep(0.1)
    return int(pids.read_text().split()[0])


def _ends(pid):
    """Whether process `pid` ends within 5 s."""
    for _ in range(50):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _kill_all(files):
    """SIGKILL to every process id listed in `files` (those that exist)."""
    for pid in [int(p) for f in files if f.exists() for p in f.read_text().split()]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_check_cut_short_brings_back_the_summary_so_far(tmp_path, sig):
    """The device tool stops a call at its limit: the summary in $OUT still names the stage that
    was running (written as each stage starts, and every 20 s); a TERM stops that stage's command
    too, though its timeout process leads a process group of its own."""
    pids = tmp_path / "pids"
    fake = _stand_in(tmp_path / "python", STAND_IN.format(python=sys.executable))
    env = _env(tmp_path, PYTHON=str(fake), STAND_IN_PIDS=str(pids))
    proc = subprocess.Popen(["bash", SCRIPT, "--only", "perf"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        perf = _stand_in_pid(pids)  # the perf stage's command has started
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
        summary = (tmp_path / "out" / "summary.md").read_text()
        assert "| perf | default | did not finish (running when this summary was written) | - | - |" in summary
        assert ("**The check was stopped by a signal after" in summary) == (sig == signal.SIGTERM)
        if sig == signal.SIGTERM:
            assert _ends(perf)
    finally:
        proc.kill()
        _kill_all([*(tmp_path / "logs").glob("*.pid"), pids])


@pytest.mark.parametrize("args", [("--only", "nope"), ("--skip", "tests,bogus"), ("--frobnicate",)])
def test_bad_arguments_are_refused(tmp_path, args):
    proc = _run(tmp_path, *args, timeout=30)
    assert proc.returncode == 2 and ("unknown stage" in proc.stderr or "unknown argument" in proc.stderr)


MACHINE_START_S, DEVICE_BUDGET_S = 30, 900  # measured 2026-11-30; a session's device time
PREBUILT_S = 20  # the build stage with the prebuilt library: a copy and an import of torch and idd_ops


def test_a_whole_check_fits_five_minutes_with_the_prebuilt_library():
    """The stages' default limits (tests, tests-next and demo share one window) with the build stage
    at its prebuilt cost add up to at most 5 minutes, so that two calls of the whole check, each
    with a machine start, leave time for a third, shorter one in a session's 15 minutes of device
    time; building there instead still fits two. --list says so."""
    text = open(SCRIPT).read()
    limits = {k: int(v) for k, v in re.findall(r"(\w+_S)=\$\{\1:-(\d+)\}", text)}
    assert set(limits) == {"ENV_S", "BUILD_S", "TESTS_S", "PERF_S", "TRAIN_S"}
    rest = sum(limits.values()) - limits["BUILD_S"]
    assert rest + PREBUILT_S <= 300 and 2 * (rest + PREBUILT_S + MACHINE_START_S) + 180 < DEVICE_BUDGET_S
    assert 2 * (rest + limits["BUILD_S"] + MACHINE_START_S) < DEVICE_BUDGET_S
    listing = subprocess.run(["bash", SCRIPT, "--list"], capture_output=True, text=True, timeout=30).stdout
    assert f"in all       {rest} s" in listing and f"{rest + PREBUILT_S} s with the prebuilt library" in listing
    assert f"{rest + limits['BUILD_S']} s building there" in listing
    for stage in STAGES:
        assert re.search(rf"^  {re.escape(stage)} ", listing, re.M), stage
    assert listing.rstrip().splitlines()[-1].strip().startswith("window)")  # the table alone


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
skipped="2" tests="10" time="41.5"><testcase classname="tests.test_a" name="test_ok[cuda]" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad[cuda]" time="0.1"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_b" name="test_err[cuda]" time="0.1"><error message="crash">y</error></testcase>
</testsuite></testsuites>"""


def test_summary_of_stages_tests_and_sections(tmp_path):
    logs = tmp_path
    (logs / "check.info").write_text("2026-01-01T00:00:00Z dry=0\n")
    (logs / "stages").write_text("env\nbuild\ntests\ntests-next\nperf\ntrain\n")
    for name, status in [("env", "0 2 10"), ("build", "0 50 80"), ("tests", "1 44 70"), ("tests-next", "124 70 70"),
                         ("perf", "1 80 90")]:  # train: no status, as when the call was cut short
        (logs / f"{name}.status").write_text(status + "\n")
        (logs / f"{name}.log").write_text("\n".join(f"{name} line {i}" for i in range(40)) + "\n")
    (logs / "tests.xml").write_text(JUNIT)
    (logs / "perf.section.md").write_text("## perf: key rows\n\n| row |\n- MISSED something\n")
    text = gpu_check_summary.summary(str(logs), elapsed=250)
    assert "250 s in all" in text
    assert "| env | - | passed | 2 | 10 |" in text and "| tests | default | FAILED, rc 1 | 44 | 70 |" in text
    assert "| tests-next | IDD_OPS_CUDA_NEXT=1 | FAILED, rc 124 (time limit) | 70 | 70 |" in text
    assert "| train | default | did not finish (running when this summary was written) | - | - |" in text
    assert "## tests (default kernels): 6 passed, 1 failed, 1 errors, 2 skipped in 42 s" in text
    assert "- FAILED tests.test_a::test_bad[cuda]" in text and "- FAILED tests.test_b::test_err[cuda]" in text
    assert "## perf: key rows" in text and "- MISSED something" in text
    assert "perf line 39" in text and "perf line 14" not in text  # the failed stage's last 25 lines
    assert "env line 39" not in text  # a passed stage's log stays in the tarball
    assert "| build | - | passed | 50 | 80 |" in text
    (logs / "build.log").write_text("prebuilt CUDA library installed: _C.abi3.so of revision r1\nCUDA kernels loaded\n")
    assert "| build | - | passed (prebuilt library) | 50 | 80 |" in gpu_check_summary.summary(str(logs), elapsed=250)
    (logs / "build.log").write_text("prebuilt CUDA library not used: built against torch 2.11.0+cu130 (torch), "
                                    "this interpreter has 2.12.0+cu130\nbuilding the CUDA library here\n")
    assert ("| build | - | passed (built there: built against torch 2.11.0+cu130 (torch), this interpreter has "
            "2.12.0+cu130) |") in gpu_check_summary.summary(str(logs), elapsed=250)
    gpu_check_summary.main([str(logs), str(tmp_path / "summary.md"), "3"])
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check")


RESULTS = [{"collected": 9},
           {"test": "tests/test_a.py::test_ok[cuda]", "outcome": "passed", "seconds": 0.5},
           {"test": "tests/test_a.py::test_slow[cuda]", "outcome": "passed", "seconds": 31.0},
           {"test": "tests/test_a.py::test_bad[cuda]", "outcome": "failed", "seconds": 2.0,
            "message": "E   AssertionError: boom\ntests/test_a.py:7: AssertionError"},
           {"test": "tests/test_b.py::test_skip[cuda]", "outcome": "skipped", "seconds": 0.0},
           {"test": "tests/test_b.py::test_fixture[cuda]", "outcome": "error", "seconds": 0.1, "message": "E   crash"},
           {"test": "tests/test_b.py::test_known[cuda]", "outcome": "xfailed", "seconds": 0.2},
           {"test": "tests/test_b.py::test_fixed[cuda]", "outcome": "xpassed"}, []]  # no seconds; not a record


def test_summary_from_the_per_test_log_of_a_stopped_run(tmp_path):
    """A test stage stopped by its time limit leaves no junit file: the summary reads the per-test
    log instead (a last line cut in half is skipped), with each failure's end and the slowest."""
    import json

    (tmp_path / "stages").write_text("tests-next\n")
    (tmp_path / "tests-next.status").write_text("124 150 150\n")
    lines = [json.dumps(r) for r in RESULTS] + ['{"test": "tests/test_c.py::te']
    (tmp_path / "tests-next.jsonl").write_text("\n".join(lines))
    text = gpu_check_summary.summary(str(tmp_path))
    assert ("## tests-next (IDD_OPS_CUDA_NEXT=1 kernels): 6 of 9 collected ran: 2 passed, 1 failed, 1 errors, "
            "1 skipped, 1 xfailed, 1 xpassed; 34 s of test time across the workers") in text
    assert "- XPASSED tests/test_b.py::test_fixed[cuda] (0.0 s)" in text
    assert "- FAILED tests/test_a.py::test_bad[cuda] (2.0 s)" in text and "  E   AssertionError: boom" in text
    assert "- ERROR tests/test_b.py::test_fixture[cuda] (0.1 s)" in text and "  E   crash" in text
    assert "Slowest 6: tests/test_a.py::test_slow[cuda] 31.0 s; tests/test_a.py::test_bad[cuda] 2.0 s" in text


@pytest.mark.parametrize("workers", [None, "2"])
def test_the_per_test_log_is_written_as_tests_finish(tmp_path, workers):
    """tests/result_log.py under plain pytest and under xdist (the controller writes; the workers
    do not): the collected count, every outcome, and the end of a failure's report."""
    import json

    if workers:
        pytest.importorskip("xdist")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'one is not two'\n\n"
        "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('fixture broke')\n\ndef test_error(broken):\n    pass\n\n"
        "@pytest.mark.xfail(reason='known')\ndef test_known():\n    assert False\n")
    log = tmp_path / "results.jsonl"
    env = dict(os.environ, IDD_OPS_TEST_LOG=str(log), PYTHONPATH=os.path.join(ROOT, "tests"))
    env.pop("PYTEST_XDIST_WORKER", None)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "result_log", "-p", "no:cacheprovider", str(tmp_path)]
    proc = subprocess.run(args + (["-n", workers] if workers else []), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0] == {"collected": 5}
    outcomes = {r["test"].split("::")[1]: r["outcome"] for r in records[1:]}
    assert outcomes == {"test_ok": "passed", "test_bad": "failed", "test_skipped": "skipped", "test_error": "error",
                        "test_known": "xfailed"}
    messages = {r["test"].split("::")[1]: r.get("message", "") for r in records[1:]}
    assert "one is not two" in messages["test_bad"] and "fixture broke" in messages["test_error"]
    assert messages["test_ok"] == ""


def test_test_files_run_in_priority_order_each_once():
    """The test stages pass every tests/test_*.py once, the CUDA-specific files first and the broad
    parametrisations last, so that a time limit cuts the least."""
    text = open(SCRIPT).read()
    function = text[text.index("FIRST="):text.index("\n}\n", text.index("ordered_tests()")) + 3]
    files = subprocess.run(["bash", "-c", function + "ordered_tests"], cwd=ROOT, capture_output=True, text=True,
                           timeout=30).stdout.split()
    assert sorted(files) == sorted(f"tests/{n}" for n in os.listdir(os.path.join(ROOT, "tests"))
                                   if n.startswith("test_") and n.endswith(".py"))
    assert files[:2] == ["tests/test_cuda_runtime.py", "tests/test_cuda_parity.py"]
    assert files[-1] == "tests/test_idd_tail.py"


def _collected(env_value):
    env = dict(os.environ, IDD_OPS_SLOW_FIRST=env_value)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_centroids.py", "tests/test_compile.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_slow_tests_first_when_asked():
    """IDD_OPS_SLOW_FIRST=1 (the GPU check's test stages) moves the tests that compile to the
    front, each group in collection order; without it the order is the collection's."""
    plain, slow_first = _collected("0"), _collected("1")
    slow = [t for t in plain if any(w in t.split("::")[-1].lower() for w in SLOW_WORDS)]
    assert len(slow) >= 3 and sorted(plain) == sorted(slow_first) and plain != slow_first
    assert slow_first == slow + [t for t in plain if t not in slow]


def test_xdist_workers_share_the_cores():
    """Each pytest-xdist worker takes its share of the cores for torch's threads (at least 2),
    unless OMP_NUM_THREADS is set or there is one worker."""
    from conftest import worker_threads

    assert worker_threads(16, 15, cores=16) == 2
    assert worker_threads(16, 4, cores=16) == 4
    assert worker_threads(2, 2, cores=2) == 2
    assert worker_threads(16, 1, cores=16) == 16
    assert worker_threads(16, 8, omp_num_threads="16", cores=16) == 16
    assert worker_threads(3, 2, cores=16) == 3  # never more than torch chose
