"""The next kernel set's class-sum passes (IDD_OPS_CUDA_NEXT; csrc/cuda/class_sums_fold.cuh), run
by the emulator of tests/cuda_emu: a pass split into pixel segments is finished by the last of each
(image, channel tile)'s blocks to arrive (grid_tickets.cuh), where the default set launches the
combine kernel after it. The sums and counts must be the default set's bits (the same additions
in the same order) whichever block comes last, from the same pass launches and no combine.
"""
import pytest
import torch

from test_cuda_emulated import emu  # noqa: F401  (emu: the module's fixture)
from test_cuda_emulated_sums import CASES, COMBINE, PAIRS, feats, launches, slots

f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16

# Every plan of test_cuda_emulated_sums (the next set's kernels serve unsplit passes too), and
# split ones with several images and tiles, whose ticket counters (one an image and tile) must not
# mix.
PLANS = [c[:8] for c in CASES] + [
    ("P-split-three-images-three-tiles", 3, 5, 64, 64, 7, f32, "nchw"),
    ("P-split-f64-two-images", 2, 4, 48, 64, 5, f64, "nchw"),
    ("W-split-two-images", 2, 3, 64, 64, 24, f32, "nchw"),
    ("L-vec-split-two-images-two-tiles", 2, 136, 32, 32, 3, f32, "cl"),
    ("L-lane-split-bf16", 2, 5, 48, 48, 7, bf16, "cl"),
]


def run(emu, cuda_next, seed, call):
    """call() on the chosen kernel set, and the launches it made: (blocks, threads, shared)."""
    emu._emu_configure(cuda_next, seed)
    emu._emu_launch_log()
    out = call()
    return out, launches(emu)


def same_bits(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("B,C,H,W,K,dtype,layout", [c[1:] for c in PLANS], ids=[c[0] for c in PLANS])
def test_every_plan_gives_the_default_bits(emu, B, C, H, W, K, dtype, layout):
    """The same pass launch, no combine after a split one, and the default set's bits: a split pass
    under three orders of the blocks (a different last block of each group)."""
    x, s = feats(B, C, H, W, dtype, layout), slots(B, H, W, K, blocky=K < 1000)
    want, log = run(emu, False, 1, lambda: emu.class_sums(x, s, K))
    split = log[-1][1:] == COMBINE
    for seed in (1, 2, 3) if split else (1,):
        got, got_log = run(emu, True, seed, lambda: emu.class_sums(x, s, K))
        assert got_log == (log[:-1] if split else log)
        same_bits(got, want)


@pytest.mark.parametrize("a,b,K,sum_launches,combines", [p[1:] for p in PAIRS if p[-1]],
                         ids=[p[0] for p in PAIRS if p[-1]])
def test_split_pairs_finished_by_their_last_blocks(emu, a, b, K, sum_launches, combines):
    """class_sums_pair with one or both passes split, in one grid (the second job's counters
    after the first's) or in two launches."""
    B = 2
    xa, xb = feats(B, *a[:3], a[3], a[4]), feats(B, *b[:3], b[3], b[4], seed=1)
    sa, sb = slots(B, *a[1:3], K), slots(B, *b[1:3], K, seed=1)
    want, log = run(emu, False, 1, lambda: emu.class_sums_pair(xa, sa, xb, sb, K))
    assert len(log) == sum_launches + combines
    for seed in (1, 2, 3):
        got, got_log = run(emu, True, seed, lambda: emu.class_sums_pair(xa, sa, xb, sb, K))
        assert got_log == log[:sum_launches]
        same_bits(got, want)


def test_split_sums_of_the_public_loss():
    """IDD forward+backward at B=2 through the public function on the emulated CUDA path, with
    the class sums split into segments: on the next set they take no launch of their own, and
    the loss and gradient are the default set's bits."""
    import idd_ops
    from cuda_emu.override import emulated_cuda

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 24, 32, 64, generator=g), torch.randn(2, 40, 32, 64, generator=g)
    y = torch.randint(0, 7, (2, 64, 128), generator=g)
    results = {}
    for kernel_set in ("default", "next"):
        with emulated_cuda(kernel_set, seed=3) as emu:
            # a first call fills the stream's ticket counters, once: the second is the one counted
            idd_ops.inter_class_distance_loss(s.clone().requires_grad_(), t, y, 7).backward()
            x = s.clone().requires_grad_()
            before = emu._emu_launches()
            loss = idd_ops.inter_class_distance_loss(x, t, y, 7)
            loss.backward()
            results[kernel_set] = (loss.detach(), x.grad, emu._emu_launches() - before)
    # the slot map, the pair's class sums (and on the default set their combine), the tail's
    # forward (the default set: its tile and finish kernels) and backward, the class-sum backward
    assert (results["next"][2], results["default"][2]) == (5, 7)
    same_bits(results["next"][:2], results["default"][:2])
