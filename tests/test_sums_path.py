"""The class-sum path (_label_slots -> class_sums(_pair) -> centroids = sums / counts) under the
public functions' own tests: the tests below are imported from their modules and run again here
with the path forced on, on every device (on the CPU it is off by default for NCHW features; CUDA
takes it always), so all of its math is held to the reference here."""
import pytest

from idd_ops import _switches
from test_baselines import test_gradcheck as test_baseline_gradcheck  # noqa: F401
from test_baselines import test_ifvd_ignored_pixels_score_one  # noqa: F401
from test_baselines import test_low_precision_forward as test_baseline_low_precision  # noqa: F401
from test_baselines import test_matches_reference as test_baseline_matches_reference  # noqa: F401
from test_centroids import (test_absent_and_ignored_classes_are_zero, test_empty_batch,  # noqa: F401
                            test_gradcheck, test_label_dtypes_and_strided_labels, test_matches_reference,
                            test_non_contiguous_features, test_resize_matches_interpolate)
from test_api import test_reference_has_batch_centroids  # noqa: F401
from test_compile import test_compiled_loss_fullgraph  # noqa: F401
from test_idd_loss import test_gradcheck as test_idd_gradcheck  # noqa: F401
from test_idd_loss import test_low_precision_and_layouts as test_idd_low_precision  # noqa: F401
from test_idd_loss import test_matches_reference as test_idd_matches_reference  # noqa: F401
from test_many_classes import test_many_classes, test_wide_features  # noqa: F401


@pytest.fixture(autouse=True)
def class_sums_path(monkeypatch):
    monkeypatch.setattr(_switches, "class_sums_path", lambda device, channels_last=False: True)
