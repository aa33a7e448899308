"""The public API on CPU tensors through the emulated CUDA kernels.

    with emulated_cuda("default") as emu:
        idd_ops.inter_class_distance_loss(...)   # runs the CUDA kernels, emulated

The emulated kernels are stacked over idd_ops' CPU kernels, and the Python and composite path
switches are set as they are on CUDA (tests/conftest.py's IDD_OPS_EMULATE_CUDA runs whole test
files so; tests/cuda_emu/report.py measures the traffic of each op so).
"""
import os
from contextlib import contextmanager
from unittest import mock

from idd_ops import _switches

from . import build

# The kernel sets: "default", what CUDA runs, and "next", what IDD_OPS_CUDA_NEXT=1 selects
# (csrc/common/cuda_next.h; at present SKD's pivot, pooling, centring and gradient kernels with
# their loads ahead, the IDD tail's forward in one kernel, IFVD's two maps and its loss, the class
# means, pixel KD's and CWD's sums and SKD's sum in one op each). A set that changes a Python path
# switch sets it below, set by set.
KERNEL_SETS = ("default", "next")
_active = []  # the (kernel set, seed, groups) of each emulated_cuda block entered and not yet left


def _configure(emu, kernel_set, seed, groups):
    emu._emu_configure(kernel_set == "next", seed)
    if kernel_set == "next":
        emu._emu_next_groups(groups)


@contextmanager
def emulated_cuda(kernel_set="default", seed=0, groups="1"):
    """kernel_set: one of KERNEL_SETS; seed: of the emulator's block and thread orders; groups:
    the next set's IDD_OPS_CUDA_NEXT value (default every group; "all,-skd" all but SKD's:
    idd_ops._switches.NEXT_GROUPS). Yields the emulated library's ops. Blocks nest: leaving an
    inner one restores the outer one's set."""
    if kernel_set not in KERNEL_SETS:
        raise ValueError(f"kernel_set: expected one of {KERNEL_SETS}, got {kernel_set!r}")
    on = _switches.next_groups(groups) if kernel_set == "next" else frozenset()
    emu = build.load()
    _configure(emu, kernel_set, seed, groups)
    # CUDA's paths for the CPU tensors the emulator runs on: the class-sum path, the slot map,
    # SKD's batched formulation, and on the next set IFVD's two maps, the class means, pixel KD's
    # sum and SKD's in one op each
    with mock.patch.object(_switches, "class_sums_path", lambda device, channels_last=False: True), \
            mock.patch.object(_switches, "slot_map_path", lambda device: True), \
            mock.patch.object(_switches, "ifvd_maps_path", lambda device: "ifvd" in on), \
            mock.patch.object(_switches, "class_means_path", lambda device: "class_means" in on), \
            mock.patch.object(_switches, "pixel_kd_sum_path", lambda device: "pixel_kd" in on), \
            mock.patch.object(_switches, "affinity_sum_path", lambda device: "skd" in on), \
            mock.patch.dict(os.environ, {"_IDD_OPS_SKD_BATCHED": "1"}):
        if not _active:
            emu._emu_override(True)
        _active.append((kernel_set, seed, groups))
        try:
            yield emu
        finally:
            _active.pop()
            if _active:
                _configure(emu, *_active[-1])
            else:
                emu._emu_override(False)
