"""The differential fuzzer of tests/fuzz at a fixed seed: random cases of every public loss and
every op with CUDA kernels against the float64 reference, forward and backward, on the CPU
kernels and their alternative formulations, on both CUDA kernel sets under the emulator (6 s
for the four on 2 cores), and on a GPU with a larger budget (selected by `-m gpu`, as
tools/gpu_check.sh does, under both IDD_OPS_CUDA_NEXT settings). A failure prints each mismatch's reproducer:
`python -m tests.fuzz --targets TARGET --repro OP:SEED`.

Longer runs: `python -m tests.fuzz --targets cpu,cpu_alt,default,next --cases 5000 --seed N`.
"""
import pytest
import torch

from fuzz import runner, targets

SEED = 20261202
CASES = 176  # per target: 11 of each of the 16 op generators
GPU_CASES = 640


def _run(target, cases):
    why = targets.unavailable(target)
    if why:
        pytest.skip(why)
    report = runner.run([target], cases, SEED)
    assert report.cases == cases
    if not report.ok:
        pytest.fail(report.summary(), pytrace=False)


@pytest.mark.parametrize("target", ["cpu", "cpu_alt", "default", "next"])
def test_fuzz_against_the_reference(target):
    """Emulated targets build the emulator as tests/test_cuda_emulated.py does (build.load(),
    cached in build/cuda_emu), and are skipped where it cannot be built here."""
    _run(target, CASES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fuzz_on_cuda():
    """The GPU's own kernels (and rounding) on the kernel set IDD_OPS_CUDA_NEXT selects."""
    _run("cuda", GPU_CASES)
