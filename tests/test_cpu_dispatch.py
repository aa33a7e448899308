"""The CPU kernel variants (baseline x86-64, AVX2 and AVX-512, csrc/cpu/dispatch.h) agree: the
AVX2 and AVX-512 ones fuse multiply-adds, so within rounding (torch.testing.assert_close's
defaults per dtype); the environment variable IDD_OPS_CPU_CAPABILITY selects them."""
import os
import subprocess
import sys

import pytest
import torch

import idd_ops  # noqa: F401

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_variant_outputs.py")
# the idd_ops under test (a source tree's or an installed wheel's), for the subprocesses
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(idd_ops.__file__)))


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


AVX2 = {"avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def best_capability():
    flags = cpu_flags()
    return "avx512" if AVX512 <= flags else "avx2" if AVX2 <= flags else "default"


def run_probe(path, capability, runner=()):
    env = dict(os.environ, IDD_OPS_CPU_CAPABILITY=capability, PYTHONPATH=IMPORT_ROOT)
    proc = subprocess.run([*runner, sys.executable, PROBE, str(path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


def assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key != "capability":
            for x, y in zip(a[key], b[key]):
                torch.testing.assert_close(x, y, msg=key)


def assert_bitwise_equal(a, b, float64_ulps=False):
    """Every output bitwise equal; float64_ulps: float64 ones within a few ulp (across CPUs,
    glibc's double exp/log pick an FMA or SSE2 implementation of their own)."""
    assert a.keys() == b.keys()
    for key in a:
        if key == "capability":
            continue
        for x, y in zip(a[key], b[key]):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            if float64_ulps and x.dtype == torch.float64:
                torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-16, msg=key)
                continue
            assert torch.equal(x.view(-1).view(torch.uint8) if x.is_floating_point() else x,
                               y.view(-1).view(torch.uint8) if y.is_floating_point() else y), key


def test_capability_reported():
    cap = torch.ops.idd_ops._cpu_capability()
    assert cap in ("default", "avx2", "avx512")
    forced = os.environ.get("IDD_OPS_CPU_CAPABILITY", "").lower()
    order = ["default", "avx2", "avx512"]
    if forced in order:  # a request only lowers the choice
        assert cap == order[min(order.index(forced), order.index(best_capability()))]
    else:
        assert cap == best_capability()


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_variants_agree(tmp_path, capability):
    base = run_probe(tmp_path / "default.pt", "default")
    other = run_probe(tmp_path / f"{capability}.pt", capability)
    assert base["capability"] == "default"
    if other["capability"] != capability:
        # only where the CPU lacks it: a request for AVX2 that chose the baseline on a CPU with
        # AVX2 + FMA made this test skip and compare nothing (mutation-checked)
        order = ["default", "avx2", "avx512"]
        assert order.index(best_capability()) < order.index(capability) and other["capability"] == best_capability(), \
            f"IDD_OPS_CPU_CAPABILITY={capability} chose {other['capability']} on a CPU whose best is {best_capability()}"
        pytest.skip(f"this CPU has no {capability}: the variant cannot run")
    assert_close(base, other)


def test_bad_capability_names_the_variable():
    env = dict(os.environ, IDD_OPS_CPU_CAPABILITY="avx9000", PYTHONPATH=IMPORT_ROOT)
    code = "import torch, idd_ops; torch.ops.idd_ops._cpu_capability()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "IDD_OPS_CPU_CAPABILITY" in proc.stderr and "avx9000" in proc.stderr
