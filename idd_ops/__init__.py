"""idd_ops: fused kernels for distilling inter-class distance in semantic segmentation."""
import torch

from . import _C  # noqa: F401  (loads the compiled library: registers torch.ops.idd_ops)
from . import _ops  # noqa: F401  (fake kernels and autograd for those ops)
from . import nn, reference
from .baselines import (channel_wise_distillation_loss, intra_class_variation_loss, pixel_kd_loss,
                        structural_kd_loss)
from .distiller import Distiller
from .functional import class_centroids, class_distance_matrix, inter_class_distance_loss
from .position import position_encoding_loss, position_maps
from .probe import probe_position_information

__version__ = "0.1.0"


def cuda_available():
    """True when the CUDA kernels were compiled in and a GPU is visible."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "idd_ops::class_centroids", "CUDA")


__all__ = ["class_centroids", "class_distance_matrix", "inter_class_distance_loss", "position_maps",
           "position_encoding_loss", "probe_position_information", "pixel_kd_loss", "channel_wise_distillation_loss",
           "structural_kd_loss", "intra_class_variation_loss", "Distiller", "nn", "reference", "cuda_available"]
