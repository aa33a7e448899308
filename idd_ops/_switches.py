"""Python side of the IDD_OPS_CUDA_NEXT switch (csrc/common/cuda_next.h).

GPU code written since the last GPU run lands switched off: the tested path stays the default and
IDD_OPS_CUDA_NEXT=1 selects the new one. Read once per process, like the C++ side.
"""
import functools
import os


@functools.lru_cache(maxsize=None)
def cuda_next_enabled() -> bool:
    return os.environ.get("IDD_OPS_CUDA_NEXT", "0") == "1"
