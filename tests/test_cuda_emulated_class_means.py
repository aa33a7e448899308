"""_class_means' CUDA kernels (csrc/cuda/class_means_cuda.cu) on the emulator of tests/cuda_emu:
the bits of the op's ATen formulation on the CPU, forward and backward, in every dtype, one
launch each."""
import pytest
import torch

from test_class_means import DTYPES, sums_and_counts
from test_cuda_emulated import CPU, emu, kernels  # noqa: F401  (emu, kernels: fixtures)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 19, 300), (1, 1, 1)], ids=["small", "cityscapes_k", "one"])
def test_matches_the_cpu_op(kernels, dtype, shape):
    sums, counts = sums_and_counts(*shape)
    before = kernels._emu_launches()
    got = kernels._class_means(sums, counts, dtype)
    assert torch.equal(got, CPU._class_means(sums, counts, dtype))
    grad = torch.randn(sums.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert torch.equal(kernels._class_means_backward(grad, counts), CPU._class_means_backward(grad, counts))
    assert kernels._emu_launches() - before == 2


def test_empty(kernels):
    sums, counts = torch.zeros(0, 4, 3, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.int64)
    before = kernels._emu_launches()
    assert kernels._class_means(sums, counts, torch.float32).shape == (0, 4, 3)
    assert kernels._emu_launches() == before
