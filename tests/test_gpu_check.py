"""The one-call GPU check (tools/gpu_check.sh) is known to work before a GPU is available: its
dry run checks every stage's prerequisites and collects the GPU tests; its options, its time
budget and its summary (tools/gpu_check_summary.py) are checked here too."""
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
STAGES = ("env", "build", "tests", "tests-next", "demo", "perf", "train")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_check_summary  # noqa: E402


def _run(tmp_path, *args, timeout=300):
    env = dict(os.environ, OUT=str(tmp_path / "out"), LOGS=str(tmp_path / "logs"))
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_dry_run(tmp_path):
    proc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.md"]  # the device tool brings back 8 files at most
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in summary and "dry run: not run" in summary, stage
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
        collected = tar.extractfile("./collect.log").read().decode()
    assert {f"{s}.log" for s in STAGES} <= names and "targets.md" in names
    assert "[cuda" in collected and "test_cuda_kernels_are_built_where_a_gpu_is_visible" in collected
    assert "--kernels default next" in (tmp_path / "logs" / "perf.cmd").read_text()


def test_only_and_skip_select_stages(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--only", "demo,perf", "--skip", "perf")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "logs" / "stages").read_text().split() == ["demo"]
    assert "IDD_OPS_CUDA_NEXT=1" in (tmp_path / "logs" / "demo.cmd").read_text()
    assert not (tmp_path / "logs" / "collect.log").exists()  # the dry run checks the selected stages only


@pytest.mark.parametrize("args", [("--only", "nope"), ("--skip", "tests,bogus"), ("--frobnicate",)])
def test_bad_arguments_are_refused(tmp_path, args):
    proc = _run(tmp_path, *args, timeout=30)
    assert proc.returncode == 2 and ("unknown stage" in proc.stderr or "unknown argument" in proc.stderr)


def test_the_whole_check_fits_in_five_minutes():
    """The sequential stages' default limits (tests, tests-next and demo share one window) add up
    to under 300 s, and --list says so."""
    text = open(SCRIPT).read()
    limits = {k: int(v) for k, v in re.findall(r"(\w+_S)=\$\{\1:-(\d+)\}", text)}
    assert set(limits) == {"ENV_S", "BUILD_S", "TESTS_S", "PERF_S", "TRAIN_S"}
    assert sum(limits.values()) < 300
    listing = subprocess.run(["bash", SCRIPT, "--list"], capture_output=True, text=True, timeout=30).stdout
    assert f"in all       {sum(limits.values())} s" in listing
    for stage in STAGES:
        assert re.search(rf"^  {re.escape(stage)} ", listing, re.M), stage


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
    assert "| train | both | did not finish (stopped) | - | - |" in text
    assert "## tests (default kernels): 6 passed, 1 failed, 1 errors, 2 skipped in 42 s" in text
    assert "- FAILED tests.test_a::test_bad[cuda]" in text and "- FAILED tests.test_b::test_err[cuda]" in text
    assert "## perf: key rows" in text and "- MISSED something" in text
    assert "perf line 39" in text and "perf line 14" not in text  # the failed stage's last 25 lines
    assert "env line 39" not in text  # a passed stage's log stays in the tarball
    gpu_check_summary.main([str(logs), str(tmp_path / "summary.md"), "3"])
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check")
