"""pytest-benchmark entries: every case of the report's CPU list (benchmarks/cases.py FULL: each
loss at its benchmark shapes, SKD without pooling included, whose reference takes about 8 GiB),
fused vs reference, forward and forward+backward. Peak memory (benchmarks.peak, profiler) goes
into each entry's extra_info; `-k` selects cases, e.g. `-k "position_loss and 64x128"`.

    python -m pytest benchmarks -q --benchmark-columns=median,min,max
"""
import pytest

from benchmarks import cases, peak

_built = {}


def _case(name):
    if name not in _built:
        _built.clear()  # one case's inputs in memory at a time
        _built[name] = cases.make(name)
    return _built[name]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("name", cases.FULL)
def test_case(benchmark, name, impl, backward):
    case = _case(name)
    fn = case.build(impl, backward)
    benchmark.group = f"{name} {'forward+backward' if backward else 'forward'}"
    case.inputs[0].grad = None
    benchmark.extra_info["peak_memory_mib"] = peak.measure(fn, held=lambda: [case.inputs[0].grad])[0] / 2**20
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
