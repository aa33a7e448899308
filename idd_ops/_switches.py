"""Python side of the IDD_OPS_CUDA_NEXT switch (csrc/common/cuda_next.h).

GPU code written since the last GPU run lands switched off: the tested path stays the default and
IDD_OPS_CUDA_NEXT=1 selects the new one, or a list of groups (NEXT_GROUPS) some of it: "skd,ifvd",
or "all,-skd" for all but SKD's (csrc/common/next_groups.h, whose rules next_groups follows). Read
once per process, like the C++ side. Behind it on the Python side at present: IFVD's two maps and
its loss in one op each (ifvd_maps_path), the class means in one (class_means_path), pixel KD and
CWD reduced in one (pixel_kd_sum_path) and SKD reduced in one (affinity_sum_path); the C++ side's
own list is in csrc/common/cuda_next.h. The path selections below are per device.
"""
import functools
import os

import torch


# The groups of code behind the switch, in the bit order of csrc/common/next_groups.h's NextGroup.
# The last three are read here alone; "skd" on both sides.
NEXT_GROUPS = ("skd", "idd_tail", "class_sums", "position", "cosine_backward", "ifvd", "class_means", "pixel_kd")


def next_groups(spec) -> frozenset:
    """The groups an IDD_OPS_CUDA_NEXT value switches on (None: unset): "1" or "all" every group,
    "0" or "" none, else a comma list of NEXT_GROUPS read left to right, "-name" taking one off
    again. Raises ValueError on a name it does not know."""
    on = set()
    for token in (spec or "").split(","):
        token = token.strip(" \t")
        if token in ("1", "all"):
            on = set(NEXT_GROUPS)
        elif token == "0":
            on = set()
        elif token:
            name = token[1:] if token.startswith("-") else token
            if name not in NEXT_GROUPS:
                names = ", ".join(NEXT_GROUPS) or "(no groups at present)"
                raise ValueError(f"IDD_OPS_CUDA_NEXT: unknown kernel group {name!r} in {spec!r}; expected 1 or all "
                                 f"(every group), 0 (none), or a comma list of {names}, a '-' before a name taking "
                                 "it off")
            (on.discard if token.startswith("-") else on.add)(name)
    return frozenset(on)


@functools.lru_cache(maxsize=None)
def _next_from_env() -> frozenset:
    return next_groups(os.environ.get("IDD_OPS_CUDA_NEXT"))


def cuda_next_enabled(group=None) -> bool:
    """Whether IDD_OPS_CUDA_NEXT switches `group` (one of NEXT_GROUPS) on; without one, whether it
    switches any on."""
    on = _next_from_env()
    if group is None:
        return bool(on)
    if group not in NEXT_GROUPS:
        raise ValueError(f"group: expected one of {NEXT_GROUPS}, got {group!r}")
    return group in on


# The class-sum path (_label_slots -> class_sums -> centroids) on the CPU for NCHW features: off by
# default (measured no faster there than the centroid op, which the CPU's IDD bound was tuned on);
# IDD_OPS_CPU_SUMS=1 or setting this attribute turns it on. channels_last features (and [B, N, C]
# tokens) always take it on the CPU: it reads them in place where the centroid op copies them.
cpu_sums = os.environ.get("IDD_OPS_CPU_SUMS", "0") == "1"


def class_sums_path(device: torch.device, channels_last: bool = False) -> bool:
    """Whether the class passes on `device` (over channels_last features when `channels_last`)
    go through _label_slots and class_sums: always on CUDA, on the CPU as set above."""
    return device.type == "cuda" or cpu_sums or channels_last


def slot_map_path(device: torch.device) -> bool:
    """Whether the ops that read labels once per pixel take a class-slot map built once per call
    (_label_slots) instead of decoding the labels themselves: IFVD's cosine op
    (_pixel_centroid_cosine_slots, in its forward and again in its backward) and pixel KD's mask
    of kept pixels (one launch where the mask built from labels takes about 13). On the CPU (IFVD
    measured no slower, docs/ARCHITECTURE.md) and CUDA; other devices decode the labels."""
    return device.type in ("cpu", "cuda")


def ifvd_maps_path(device: torch.device) -> bool:
    """Whether IFVD's class-sum path computes both networks' maps in one op (_ifvd_maps: both
    centroid tables from the class sums in one launch, both maps in another, where the divisions
    and two slot-map cosine calls took seven launches), and for "mean" and "sum" its loss too
    (_ifvd_loss: the maps' launch adds their squared difference, and the backward's factor pass
    forms the gradient map, where mse_loss and its backward took about five launches): on CUDA
    under IDD_OPS_CUDA_NEXT (its "ifvd" group), since no GPU has run its kernels yet. Other devices
    would gain nothing from it: there it is the same ATen divisions, cosine calls and mse_loss
    (csrc/composite/ifvd_maps.cpp)."""
    return device.type == "cuda" and cuda_next_enabled("ifvd")


def class_means_path(device: torch.device) -> bool:
    """Whether the class-sum path's centroids (class_centroids, pooled batch centroids) come from
    one op (_class_means: one launch forward and one backward, where the clamp, division and cast
    took three and two): on CUDA under IDD_OPS_CUDA_NEXT (its "class_means" group), since no GPU has
    run its kernels yet. Other devices would gain nothing: there it is the same ATen calls
    (csrc/composite/class_means.cpp)."""
    return device.type == "cuda" and cuda_next_enabled("class_means")


def pixel_kd_sum_path(device: torch.device) -> bool:
    """Whether pixel KD's and CWD's "mean" and "sum" come from one op (_pixel_kd_sum: the KL of the
    kept pixels, or of CWD's rows, summed and scaled in one kernel, its backward one walk, where
    softmax_kl, the mask, the count and the division took about 13 launches forward and backward
    for pixel KD and softmax_kl and ATen's sum and scaling 5 for CWD): on CUDA under
    IDD_OPS_CUDA_NEXT (its "pixel_kd" group), since no GPU has run its kernels yet. Other devices
    would gain nothing: there it is the same ATen calls (csrc/composite/pixel_kd_sum.cpp)."""
    return device.type == "cuda" and cuda_next_enabled("pixel_kd")


def affinity_sum_path(device: torch.device) -> bool:
    """Whether SKD's "mean" and "sum" come from one op (_affinity_loss_sum: the per-image means
    added and scaled by the Gram tail's last block, the backward's scale in its gradient kernel,
    where ATen's sum and scaling took two launches forward and one backward): on CUDA under
    IDD_OPS_CUDA_NEXT (its "skd" group), since no GPU has run its kernels yet. Other devices would
    gain nothing: there it is the same ATen calls (csrc/composite/affinity_loss_sum.cpp)."""
    return device.type == "cuda" and cuda_next_enabled("skd")
