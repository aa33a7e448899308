"""Where a case runs: the CPU kernels, the CUDA kernels on the emulator of tests/cuda_emu, or a
real GPU.

- "cpu": the CPU ops as they are.
- "cpu_alt": the CPU's other formulations, which CUDA shares: the class-sum path for NCHW
  features too (IDD_OPS_CPU_SUMS) and the batched SKD (_IDD_OPS_SKD_BATCHED, the composite code
  CUDA falls back to where its fused kernels do not take a shape).
- "default": the public API and the raw ops routed through the emulated CUDA kernels
  (cuda_emu.override.emulated_cuda: the emulated kernels stacked over the CPU ones, and the
  Python path switches set as on CUDA), on CPU tensors. The emulator's block and thread order
  comes from the case's seed, so a reproducer replays the same schedule. A rewrite behind
  IDD_OPS_CUDA_NEXT adds "next" (cuda_emu/override.py's KERNEL_SETS).
- "cuda": CUDA tensors, on whichever kernel set the process selected (IDD_OPS_CUDA_NEXT is
  read once per process).

The emulator is imported as `cuda_emu` (tests/ on sys.path), the name tests/conftest.py and the
emulated tests use, so that one process never loads it twice under two names.
"""
import os
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch

import idd_ops
from cuda_emu.override import KERNEL_SETS
from idd_ops import _switches

EMULATED = KERNEL_SETS  # the emulated kernel sets
TARGETS = ("cpu", "cpu_alt", *EMULATED, "cuda")
_loaded = {}


def device_of(target: str) -> str:
    return "cuda" if target == "cuda" else "cpu"


def unavailable(target: str):
    """None where `target` can run here, else why not (a sentence)."""
    if target not in TARGETS:
        return f"unknown target {target!r}; expected one of {', '.join(TARGETS)}"
    if target == "cuda":
        if not torch.cuda.is_available():
            return "needs a GPU"
        if not idd_ops.cuda_available():
            return "the CUDA kernels were not built"
        return None
    if target in EMULATED:
        return _emulator_error()
    return None


def _emulator_error():
    """Builds (incrementally, cached in build/cuda_emu) and loads the emulator once."""
    if "error" not in _loaded:
        try:
            from cuda_emu import build

            build.load()
            _loaded["error"] = None
        except Exception as e:  # no compiler, a failed build: the emulated targets cannot run
            _loaded["error"] = f"the CUDA emulator could not be built: {type(e).__name__}: {e}"[:500]
    return _loaded["error"]


def running_on(target: str, seed: int):
    """Context under which the library calls run on `target` (tensors made on device_of(target))."""
    if target in EMULATED:
        from cuda_emu.override import emulated_cuda

        return emulated_cuda(target, seed % (2 ** 31))
    if target == "cuda":
        return _synchronized()
    if target == "cpu_alt":
        return _cpu_alternatives()
    return nullcontext()


@contextmanager
def _cpu_alternatives():
    with mock.patch.object(_switches, "cpu_sums", True), mock.patch.dict(os.environ, {"_IDD_OPS_SKD_BATCHED": "1"}):
        yield


@contextmanager
def _synchronized():
    """Wait for the GPU at the end, so an asynchronous fault belongs to the case that caused it."""
    try:
        yield
    finally:
        torch.cuda.synchronize()
