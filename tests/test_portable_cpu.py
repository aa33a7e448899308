"""The default build runs on an x86-64 CPU without AVX: the dispatched kernels run under QEMU
user-mode emulation of a Nehalem (SSE4.2, no AVX) and match the baseline variant on this CPU
bitwise (float64 softmax-KL within a few ulp: glibc's double exp/log differ by CPU). Needs
qemu-x86_64 (Debian: apt-get install qemu-user); about 20 s of CPU time."""
import platform
import shutil

import pytest

from test_cpu_dispatch import assert_bitwise_equal, run_probe

QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64", reason="qemu-x86_64 not found (qemu-user)")
def test_runs_without_avx(tmp_path):
    emulated = run_probe(tmp_path / "nehalem.pt", "avx2", runner=(QEMU, "-cpu", "Nehalem"))
    assert emulated["capability"] == "default"  # asked for the best: the CPU has no AVX2
    assert_bitwise_equal(emulated, run_probe(tmp_path / "host.pt", "default"), float64_ulps=True)
