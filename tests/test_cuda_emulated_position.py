"""position_encoding_loss on the CUDA emulator (tests/cuda_emu), branch by branch, against the
CPU op of the same name and against idd_ops.reference in float64, forward and backward.

The cases reach every map kind, the three reductions, the packed and scalar paths, widths up to
and past the column table (position_tables_max_width: past it the per-element kernel runs), and
grids with more than 256 partials and a grid-stride wrap.
"""
import pytest
import torch

import idd_ops  # noqa: F401
from idd_ops import reference
from idd_ops._position_maps import KINDS, expand_kinds
from idd_ops.position import CODES
from test_cuda_emulated import CPU, emu, kernels  # noqa: F401  (fixtures)
from test_cuda_emulated_kl import ACC, RTOL, close, gen, offset

# Widest map the column table serves (position_tables_max_width): (48 KiB - 1 KiB) of
# accumulation-dtype values; wider maps take the per-element kernel.
TABLE_WIDTH = {torch.float64: (47 * 1024) // 8, torch.float32: (47 * 1024) // 4,
               torch.float16: (47 * 1024) // 4, torch.bfloat16: (47 * 1024) // 4}


def check_position(ops, pred, kinds, reduction, grad=None, num_frequencies=1):
    elements, params, _ = expand_kinds(kinds, num_frequencies)
    codes = [CODES[e] for e in elements]
    acc = ACC[pred.dtype]
    got = ops.position_encoding_loss(pred, codes, params, reduction)
    want = CPU.position_encoding_loss(pred, codes, params, reduction)
    out_dtype = pred.dtype if reduction == "none" else acc
    assert got.dtype == want.dtype == out_dtype
    close(got, want, RTOL[out_dtype])
    p64 = pred.to(torch.float64, copy=True).requires_grad_()
    ref = reference.position_encoding_loss(p64, kinds, reduction, num_frequencies=num_frequencies)
    close(got, ref.detach(), RTOL[out_dtype])
    if grad is None:
        grad = torch.tensor(0.75, dtype=acc) if reduction != "none" else \
            torch.rand(pred.shape, generator=gen(4), dtype=acc)
    (ref * grad.double()).sum().backward()
    dgot = ops._position_encoding_loss_backward(grad, pred, codes, params, reduction)
    dwant = CPU._position_encoding_loss_backward(grad, pred, codes, params, reduction)
    assert dgot.dtype == dwant.dtype == pred.dtype
    close(dgot, dwant, RTOL[pred.dtype])
    close(dgot, p64.grad, RTOL[pred.dtype])


def maps(B, M, H, W, dtype, seed=0):
    return torch.rand(B, M, H, W, generator=gen(seed), dtype=torch.float64).to(dtype)


M_ALL = len(expand_kinds(KINDS, 1)[0])  # every elementary map once (sin/cos at one frequency)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,W", [(torch.float32, 16), (torch.float32, 13), (torch.float64, 10),
                                     (torch.float64, 7), (torch.float16, 24), (torch.float16, 12),
                                     (torch.bfloat16, 40), (torch.bfloat16, 20)], ids=str)
def test_position_branches(kernels, dtype, W, reduction):
    """Every map kind; W a multiple of the pack (16-byte packs) or not (packs of one)."""
    check_position(kernels, maps(2, M_ALL, 9, W, dtype), KINDS, reduction)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_position_five_images_two_columns(kernels, reduction):
    """The table kernels walk the batch 4 images at a time (unrolled): 5 leaves one."""
    check_position(kernels, maps(5, M_ALL, 3, 2, torch.float32), KINDS, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_position_misaligned(kernels, reduction):
    check_position(kernels, offset(maps(2, M_ALL, 5, 16, torch.float32)), KINDS, reduction)


def test_position_two_frequencies_and_transposed_grad(kernels):
    pred = maps(2, len(expand_kinds("sinusoidal", 2)[0]), 6, 8, torch.float32)
    grad = torch.rand(pred.shape[::-1], generator=gen(6)).permute(3, 2, 1, 0)
    check_position(kernels, pred, "sinusoidal", "none", grad=grad, num_frequencies=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("past", [0, 1])
def test_position_table_width(kernels, dtype, past):
    """At the column table's width the table kernel runs (a partial pass and a finalise: 2
    launches); one column more, the per-element kernel (1 launch). Plus one launch for the
    backward."""
    pred = maps(1, 2, 2, TABLE_WIDTH[dtype] + past, dtype)
    before = kernels._emu_launches()
    check_position(kernels, pred, ("horizontal", "gaussian"), "mean")
    assert kernels._emu_launches() - before == (1 if past else 2) + 1


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_position_past_the_table_in_half(kernels, reduction):
    """One column past the table the per-element kernels run, here in half and with reduction
    "none" (the elementwise errors, and an elementwise gradient in the backward)."""
    pred = maps(1, 2, 2, TABLE_WIDTH[torch.float16] + 1, torch.float16)
    before = kernels._emu_launches()
    check_position(kernels, pred, ("horizontal", "gaussian"), reduction)
    assert kernels._emu_launches() - before == 2


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_position_many_partials(kernels, reduction):
    """Narrow maps (one pack a row: blocks of 32 x 8) over 240 rows of 9 maps: 30 x 9 = 270 block
    partials (the finalise's threads each add several)."""
    check_position(kernels, maps(1, M_ALL, 240, 4, torch.float32), KINDS, reduction)


def test_position_grid_wrap(kernels):
    """More rows than one wave of blocks covers (row blocks capped at 8 * 132 / M per map): the
    table kernels' row loop wraps. Backward and "none" only (their blocks have one barrier)."""
    pred = maps(1, 64, 136, 4, torch.float32)
    kinds = ["horizontal"] * 64
    check_position(kernels, pred, kinds, "none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape, dtype", [((2, M_ALL, 9, 16), torch.float32), ((2, M_ALL, 9, 16), torch.float16),
                                          ((1, M_ALL, 240, 4), torch.float32), ((5, M_ALL, 3, 13), torch.float32)],
                         ids=["packed", "packed-half", "many-partials", "scalar"])
def test_position_sum_finished_by_the_last_block(kernels, shape, dtype, reduction):
    """The next set (IDD_OPS_CUDA_NEXT) adds the block partials in the forward's last block
    (position_tables_forward_sum): one launch where the default's partial pass and finalise take
    two, the same bits (the partials in the same order over the block's linear threads, whatever
    the block shape: 32 x 8 in the narrow maps), whichever block comes last and on a second call
    (the ticket counter left at 0)."""
    pred = maps(*shape, dtype)
    elements, params, _ = expand_kinds(KINDS, 1)
    codes = [CODES[e] for e in elements]
    want = kernels.position_encoding_loss(pred, codes, params, reduction)
    for seed in (1, 2, 2):
        kernels._emu_configure(True, seed)
        before = kernels._emu_launches()
        got = kernels.position_encoding_loss(pred, codes, params, reduction)
        assert kernels._emu_launches() - before == 1
        assert torch.equal(got, want)
