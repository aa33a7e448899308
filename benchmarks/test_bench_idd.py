"""pytest-benchmark entries for the IDD loss: fused vs reference, forward and forward+backward,
at the Cityscapes shape (B=8, student C=512, teacher C=2048, 64x128 features, 512x1024
labels, K=19). Peak memory goes into each entry's extra_info.

    python -m pytest benchmarks -q --benchmark-columns=median,min,max
"""
import pytest

import idd_ops
from idd_ops import reference
from benchmarks import common, peak

IMPLS = {"fused": idd_ops.inter_class_distance_loss, "reference": reference.inter_class_distance_loss}


@pytest.fixture(scope="module")
def inputs():
    s, t, y, K = common.make_inputs(common.SHAPES["cityscapes"])
    return s.requires_grad_(), t, y, K


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_idd_loss(benchmark, inputs, impl, backward):
    s, t, y, K = inputs
    fn = common.loss_fn(IMPLS[impl], s, t, y, K, backward)
    benchmark.group = "idd_loss " + ("forward+backward" if backward else "forward")
    benchmark.extra_info["peak_memory_mib"] = peak.measure(impl, "cityscapes", backward) / 2**20
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
