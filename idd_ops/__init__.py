"""idd_ops: fused kernels for distilling inter-class distance in semantic segmentation.

Layers, each importing only the ones below it: the public functions and modules (functional,
baselines, position, probe, nn, distiller) over the op wrappers (_ops: fake kernels and
autograd) over the compiled ops (_C, loaded by _library). ``idd_ops.reference`` (plain PyTorch)
and the private helpers it shares (_dtypes, _reduction, _position_maps) need torch alone, so the
reference imports even where the compiled library is not built or does not load; the fused names
then raise one ImportError that says why and what to do (_library.py). A copy of the package
without a compiled library that hides an installed one (a source tree in the current directory)
raises that ImportError at import.
"""
import torch

from . import _library, reference

_library.load()
_LOAD_ERROR = _library.ERROR
if _LOAD_ERROR is None:
    from . import _ops  # noqa: F401  (fake kernels and autograd for those ops)
    from . import nn
    from .baselines import (channel_wise_distillation_loss, intra_class_variation_loss, pixel_kd_loss,
                            structural_kd_loss)
    from .distiller import Distiller
    from .functional import class_centroids, class_distance_matrix, inter_class_distance_loss
    from .position import position_encoding_loss, position_maps
    from .probe import probe_position_information

__version__ = "0.1.0"

if _LOAD_ERROR is not None:
    def __getattr__(name):
        if name in __all__:
            raise ImportError(f"idd_ops.{name} needs the compiled library: {_LOAD_ERROR}") from _LOAD_ERROR.__cause__
        raise AttributeError(f"module 'idd_ops' has no attribute {name!r}")


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled in and a GPU is visible."""
    return _LOAD_ERROR is None and torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "idd_ops::class_centroids", "CUDA")


__all__ = ["class_centroids", "class_distance_matrix", "inter_class_distance_loss", "position_maps",
           "position_encoding_loss", "probe_position_information", "pixel_kd_loss", "channel_wise_distillation_loss",
           "structural_kd_loss", "intra_class_variation_loss", "Distiller", "nn", "reference", "cuda_available"]
