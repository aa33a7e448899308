"""_pixel_kd_sum's CUDA kernels (csrc/cuda/pixel_kd_sum_cuda.cu) on the emulator of tests/cuda_emu:
the CPU op's values forward and backward, and the bits of the emulated softmax_kl's walks (its
log-sum-exps, and its gradient for the per-pixel gradient this op forms), with and without slots,
for 16-byte packs and packs of one, blocks with idle threads; one launch forward (its last block
adds the blocks' parts) and one backward; the same bits whatever the order of blocks and threads,
and on a second call (the ticket counter left at 0); every output written; and pixel_kd_loss on
the emulated next set against the default set; the same over contiguous rows ([B*C, H*W, 1],
CWD's), and channel_wise_distillation_loss on the next set."""
import pytest
import torch

import idd_ops
from cuda_emu.override import emulated_cuda
from test_cuda_emulated import CPU, emu, kernels  # noqa: F401  (fixtures)
from test_pixel_kd_sum import logits_and_labels

CASES = {  # B, K, H, W, dtype
    "packs": (2, 19, 8, 16, torch.float32),
    "packs_of_one": (3, 5, 5, 7, torch.float64),  # 35 pixels: not a multiple of a pack
    "half": (2, 11, 4, 8, torch.float16),
    "bfloat16_packs_of_one": (2, 6, 3, 5, torch.bfloat16),
}
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run(ops, s, t, slots, temperature, mean, grad):
    B, K, H, W = s.shape
    args = (s.reshape(B, K, H * W), t.reshape(B, K, H * W), slots)
    loss, lse_s, lse_t, factor = ops._pixel_kd_sum(*args, temperature, mean)
    out = ops._pixel_kd_sum_backward(grad, *args, lse_s, lse_t, factor, temperature)
    return loss, lse_s, lse_t, factor, out


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("with_slots", [True, False])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_the_cpu_op(kernels, case, with_slots, mean):
    B, K, H, W, dtype = case
    s, t, y = logits_and_labels(B, K, H, W, dtype=dtype)
    slots = CPU._label_slots(y, H, W, K, 255).view(B, H * W) if with_slots else None
    grad = torch.tensor(0.75, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    before = kernels._emu_launches()
    got = run(kernels, s, t, slots, 2.0, mean, grad)
    assert kernels._emu_launches() - before == 2
    want = run(CPU, s, t, slots, 2.0, mean, grad)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL[dtype], atol=0)
    assert torch.equal(got[3], want[3])  # the factor
    for g, w in zip(got[1:3] + got[4:], want[1:3] + want[4:]):
        torch.testing.assert_close(g, w, rtol=RTOL[dtype], atol=RTOL[dtype] * float(w.abs().max()))
    # the walks are softmax_kl's own: its log-sum-exps, and its gradient for the per-pixel
    # gradient that _pixel_kd_sum forms (grad * factor at the kept pixels, 0 elsewhere), bit for bit
    x, z = s.reshape(B, K, H * W), t.reshape(B, K, H * W)
    _, lse_s, lse_t = kernels.softmax_kl(x, z, 2.0)
    assert torch.equal(got[1], lse_s) and torch.equal(got[2], lse_t)
    scaled = (grad.double() * got[3]).to(grad.dtype).expand(B, H * W)
    per_pixel = scaled if slots is None else torch.where(slots >= 0, scaled, 0.0)
    assert torch.equal(got[4], kernels._softmax_kl_backward(per_pixel, x, z, lse_s, lse_t, 2.0))


ROW_CASES = {  # outer, length, dtype: a warp a row below 2 x 256 x VEC elements, else a block
    "warp_rows": (37, 300, torch.float32),
    "block_rows": (3, 2100, torch.float32),
    "rows_of_one": (5, 33, torch.float64),  # 33 elements: no 16-byte packs
    "half_block_rows": (2, 4100, torch.float16),
}


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("with_slots", [True, False])
@pytest.mark.parametrize("case", ROW_CASES.values(), ids=ROW_CASES.keys())
def test_rows_match_the_cpu_op(kernels, case, with_slots, mean):
    """Contiguous vectors ([outer, length, 1], CWD's rows): the row kernels, the CPU op's values,
    and softmax_kl's row walks bit for bit (its log-sum-exps, and its gradient for the per-row
    gradient this op forms); one launch forward and one backward."""
    outer, length, dtype = case
    g = torch.Generator().manual_seed(outer)
    s, t = (torch.randn(outer, length, 1, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    slots = None
    if with_slots:  # about a quarter of the rows left out
        slots = torch.where(torch.rand(outer, 1, generator=g) < 0.25, -1, 0).to(torch.int16)
    grad = torch.tensor(0.75, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    args = (s, t, slots)
    before = kernels._emu_launches()
    loss, lse_s, lse_t, factor = kernels._pixel_kd_sum(*args, 2.0, mean)
    out = kernels._pixel_kd_sum_backward(grad, *args, lse_s, lse_t, factor, 2.0)
    assert kernels._emu_launches() - before == 2
    want = CPU._pixel_kd_sum(*args, 2.0, mean)
    want_out = CPU._pixel_kd_sum_backward(grad, *args, *want[1:], 2.0)
    torch.testing.assert_close(loss, want[0], rtol=RTOL[dtype], atol=0)
    assert torch.equal(factor, want[3])
    torch.testing.assert_close(out, want_out, rtol=RTOL[dtype], atol=RTOL[dtype] * float(want_out.abs().max()))
    _, row_lse_s, row_lse_t = kernels.softmax_kl(s, t, 2.0)
    assert torch.equal(lse_s, row_lse_s) and torch.equal(lse_t, row_lse_t)
    scaled = (grad.double() * factor).to(grad.dtype).expand(outer, 1)
    per_row = scaled if slots is None else torch.where(slots >= 0, scaled, 0.0)
    assert torch.equal(out, kernels._softmax_kl_backward(per_row, s, t, lse_s, lse_t, 2.0))


def test_rows_same_bits_on_every_run(emu):
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(300, 96, 1, generator=g) for _ in range(2))  # 38 blocks of 8 warp rows
    runs = []
    for seed in (1, 2, 2):
        emu._emu_configure(False, seed)
        loss, lse_s, lse_t, factor = emu._pixel_kd_sum(s, t, None, 1.5, True)
        out = emu._pixel_kd_sum_backward(torch.tensor(1.0), s, t, None, lse_s, lse_t, factor, 1.5)
        runs.append((loss, lse_s, lse_t, factor, out))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_many_images_of_few_pixels(emu):
    """40 images of 2 pixels: one block of pixels an image, its other 254 threads adding nothing
    to the block's sums, and 40 blocks' parts added by the last of them."""
    emu._emu_configure(False, 3)
    s, t, y = logits_and_labels(40, 3, 1, 2)
    slots = CPU._label_slots(y, 1, 2, 3, 255).view(40, 2)
    grad = torch.tensor(1.0, dtype=torch.float64)
    got, want = run(emu, s, t, slots, 1.0, True, grad), run(CPU, s, t, slots, 1.0, True, grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[4], want[4], rtol=1e-12, atol=1e-15)


def test_same_bits_on_every_run(emu):
    s, t, y = logits_and_labels(3, 7, 9, 30, dtype=torch.float32)
    slots = CPU._label_slots(y, 9, 30, 7, 255).view(3, 270)
    runs = []
    for seed in (1, 2, 2):
        emu._emu_configure(False, seed)
        runs.append(run(emu, s, t, slots, 1.0, True, torch.tensor(1.0)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_writes_every_output(kernels, poisoned_empties):
    s, t, y = logits_and_labels(2, 5, 6, 11)
    slots = CPU._label_slots(y, 6, 11, 5, 255).view(2, 66)
    got = run(kernels, s, t, slots, 1.0, True, torch.tensor(1.0, dtype=torch.float64))
    assert all(not g.isnan().any() for g in got)


def test_nothing_to_sum(kernels):
    """No pixels, and no classes: no launch, the CPU op's zeros and factor."""
    for shape in [(2, 5, 0), (2, 0, 6)]:
        x = torch.zeros(shape, dtype=torch.float64)
        slots = torch.zeros(shape[0], shape[2], dtype=torch.int16)
        before = kernels._emu_launches()
        got = kernels._pixel_kd_sum(x, x, slots, 2.0, True)
        assert kernels._emu_launches() == before
        for g, w in zip(got, CPU._pixel_kd_sum(x, x, slots, 2.0, True)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pixel_kd_loss_on_the_next_set(reduction):
    """The public function on the emulated CUDA path: the next set takes _pixel_kd_sum (2
    launches), the default set softmax_kl and ATen's mask and sums; values and gradients agree."""
    s, t, y = logits_and_labels(2, 19, 8, 16, dtype=torch.float32)
    results = []
    for kernel_set in ("default", "next"):
        with emulated_cuda(kernel_set) as emu:
            x = s.clone().requires_grad_()
            before = emu._emu_launches()
            loss = idd_ops.pixel_kd_loss(x, t, y, temperature=2.0, reduction=reduction)
            loss.backward()
            results.append((loss.detach(), x.grad, emu._emu_launches() - before))
    (want, want_grad, default_launches), (got, got_grad, next_launches) = results
    assert next_launches == 3 and default_launches == 3  # the slot map, then the op's 2 (1 + 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cwd_on_the_next_set(reduction):
    """channel_wise_distillation_loss on the emulated CUDA path: the next set takes _pixel_kd_sum
    over its rows (2 launches and no ATen op), the default set softmax_kl's 2 and ATen's sum and
    scaling; values and gradients agree."""
    from cuda_emu.report import aten_ops

    g = torch.Generator().manual_seed(3)
    s, t = (torch.randn(2, 6, 16, 40, generator=g) for _ in range(2))
    seed = torch.ones(())
    results = []
    for kernel_set in ("default", "next"):
        with emulated_cuda(kernel_set) as emu:
            # a first call fills the stream's ticket counters, once: the second is the one counted
            idd_ops.channel_wise_distillation_loss(s.clone().requires_grad_(), t, reduction=reduction).backward(seed)
            x = s.clone().requires_grad_()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                before = emu._emu_launches()
                loss = idd_ops.channel_wise_distillation_loss(x, t, temperature=4.0, reduction=reduction)
                loss.backward(seed)
                launches = emu._emu_launches() - before
        results.append((loss.detach(), x.grad, launches, aten_ops(prof)))
    (want, want_grad, default_launches, default_aten), (got, got_grad, next_launches, next_aten) = results
    assert next_launches == 2 and next_aten == {}, next_aten
    assert default_launches == 2 and default_aten  # softmax_kl's kernels, then ATen's
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * float(want_grad.abs().max()))


def test_slots_not_aligned_for_packs(kernels):
    """Slots 2 bytes off an 8-byte boundary, with the logits in 16-byte packs: the backward reads
    them one at a time (the emulator faults on a misaligned pack), for the same values."""
    s, t, y = logits_and_labels(2, 5, 8, 16, dtype=torch.float32)
    aligned = CPU._label_slots(y, 8, 16, 5, 255).view(2, 128)
    storage = torch.empty(2 * 128 + 1, dtype=torch.int16)
    shifted = storage[1:].view(2, 128)
    shifted.copy_(aligned)
    grad = torch.tensor(1.5)
    got, want = run(kernels, s, t, shifted, 1.0, True, grad), run(kernels, s, t, aligned, 1.0, True, grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
