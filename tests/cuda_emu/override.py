"""The public API on CPU tensors through one emulated CUDA kernel set.

    with emulated_cuda("next") as emu:
        idd_ops.inter_class_distance_loss(...)   # runs the IDD_OPS_CUDA_NEXT kernels, emulated

The emulated kernels are stacked over idd_ops' CPU kernels, and the Python and composite path
switches are set as they are on CUDA for that set (tests/conftest.py's IDD_OPS_EMULATE_CUDA runs
whole test files so; tests/cuda_emu/report.py measures the traffic of each op so).
"""
import os
from contextlib import contextmanager
from unittest import mock

from idd_ops import _switches

from . import build

KERNEL_SETS = ("default", "next")


@contextmanager
def emulated_cuda(kernel_set, seed=0):
    """kernel_set: "default" (the kernels CUDA runs today) or "next" (IDD_OPS_CUDA_NEXT=1);
    seed: of the emulator's block and thread orders. Yields the emulated library's ops."""
    if kernel_set not in KERNEL_SETS:
        raise ValueError(f"kernel_set: expected one of {KERNEL_SETS}, got {kernel_set!r}")
    emu, cuda_next = build.load(), kernel_set == "next"
    emu._emu_configure(cuda_next, seed)
    env = {"_IDD_OPS_SKD_BATCHED": "1"} if cuda_next else {}
    with mock.patch.object(_switches, "class_sums_path", lambda device, channels_last=False: cuda_next), \
            mock.patch.object(_switches, "cosine_slots_path", lambda device: cuda_next), \
            mock.patch.dict(os.environ, env):
        emu._emu_override(True)
        try:
            yield emu
        finally:
            emu._emu_override(False)
