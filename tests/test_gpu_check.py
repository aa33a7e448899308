"""The one-call GPU check (tools/gpu_check.sh) is known to work before a GPU is available:
its dry run checks that every stage's command exists and that GPU tests are collected."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("env", "build", "tests", "bench", "demo"):
        assert (tmp_path / f"{stage}.log").exists(), stage
    collected = (tmp_path / "collect.log").read_text()
    assert "[cuda" in collected and "test_cuda_kernels_are_built_where_a_gpu_is_visible" in collected
