"""The CPU kernels give the same bits at every thread count (docs/API.md, "Determinism"): each
op's value and gradient at 1, 2, 3 and 5 threads, where 3 and 5 threads split the two images'
pixels into tiles. SKD is left out: its Grams are BLAS GEMMs, whose bits follow the thread count."""
import pytest
import torch

from op_calls import OPS


@pytest.mark.parametrize("name", sorted(set(OPS) - {"skd"}))
def test_same_bits_at_every_thread_count(name):
    inputs, run = OPS[name]("cpu")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append([r.clone() for r in run(*inputs)])
    finally:
        torch.set_num_threads(before)
    for threads, got in zip((2, 3, 5), results[1:]):
        for g, want in zip(got, results[0]):
            assert torch.equal(g, want), f"{name}: {threads} threads differ from 1"
