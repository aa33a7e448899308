"""The CUDA class-sum backward (_class_sums_backward: grad[b, c, p] = grad_sums[b, slot_p, c]) run by
the emulator of tests/cuda_emu, branch by branch: the rows kernel with its table in shared memory,
the per-pixel gather past it, vector and scalar, channels_last, the 64-bit index path, and bad
slots. The launch log shows the plan the host chose; values equal the CPU op bit for bit.
"""
import pytest
import torch

from test_cuda_emulated import CPU, emu  # noqa: F401  (emu: the module's fixture)
from test_cuda_emulated_sums import bf16, f16, f32, f64, launches, ops, slots  # noqa: F401  (ops: a fixture)


@pytest.mark.parametrize("dtype", [f32, f64, f16, bf16])
@pytest.mark.parametrize("channels_last,C,H,W", [(False, 6, 4, 8), (False, 5, 3, 7), (True, 16, 3, 5),
                                                 (True, 5, 4, 6)],
                         ids=["nchw-vec", "nchw-scalar", "cl-vec", "cl-scalar"])
def test_class_sums_backward(ops, dtype, channels_last, C, H, W):
    """The gather grad[b, c, p] = grad_sums[b, slot_p, c] (0 where slot_p is -1): 16-byte vectors
    where HW (NCHW) or C (channels_last) is a multiple of the pack, scalars otherwise."""
    K = 6
    s = slots(2, H, W, K, blocky=False)
    assert (s == -1).any()
    grad = torch.randn(2, K, C, dtype=f64, generator=torch.Generator().manual_seed(3))
    got = ops._class_sums_backward(grad, s, dtype, channels_last)
    want = CPU._class_sums_backward(grad, s, dtype, channels_last)
    assert got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got, want)


def test_class_sums_backward_plans(ops):
    """NCHW: a block per (b, c) row with the row's K table entries in shared memory (one warp for
    a row of 21 pixels, 256 threads for 1024 vectors; more classes than threads: a warp stages
    300 entries; 12288 float32: the whole 48 KiB), and the per-pixel gather where K entries pass
    48 KiB (12289 float32); the same values either way. The launch log shows the plan."""
    for K, H, W, plan in [(6, 3, 7, (2 * 5, 32, 6 * 4)), (6, 64, 64, (2 * 5, 256, 6 * 4)),
                          (300, 3, 7, (2 * 5, 32, 300 * 4)), (12288, 3, 8, (2 * 5, 32, 48 * 1024)),
                          (12289, 3, 8, (1, 256, 0))]:
        s = slots(2, H, W, K, blocky=False)
        s[0, 0, :3] = K - 1
        grad = torch.randn(2, K, 5, dtype=f64, generator=torch.Generator().manual_seed(K))
        launches(ops)
        got = ops._class_sums_backward(grad, s, f32, False)
        assert launches(ops) == [plan]
        assert torch.equal(got, CPU._class_sums_backward(grad, s, f32, False))


def past_table(dtype):
    """Fewest classes whose NCHW table of one row (K values of the gradient's dtype) passes the
    48 KiB the rows kernel stages: the per-pixel gather takes them."""
    return 48 * 1024 // torch.empty(0, dtype=dtype).element_size() + 1


@pytest.mark.parametrize("dtype", [f32, f64, f16, bf16])
def test_class_sums_backward_gather(ops, dtype):
    """NCHW past the rows kernel's table (the per-pixel gather of class_sums_backward_nchw_kernel),
    vector and scalar, in every dtype: the same values as the CPU."""
    K = past_table(dtype)
    for C, H, W in [(3, 4, 4), (2, 3, 5)]:
        s = slots(2, H, W, K, blocky=False)
        s[0, 0, :3] = K - 1
        grad = torch.randn(2, K, C, dtype=f64, generator=torch.Generator().manual_seed(C))
        launches(ops)
        got = ops._class_sums_backward(grad, s, dtype, False)
        assert [(t, sh) for _, t, sh in launches(ops)] == [(256, 0)]  # the gather, not a rows block
        assert torch.equal(got, CPU._class_sums_backward(grad, s, dtype, False))


@pytest.mark.parametrize("dtype", [f32, f64, f16, bf16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_class_sums_backward_index64(ops, channels_last, dtype, monkeypatch):
    """The 64-bit index path (IDD_OPS_FORCE_INDEX64=1) of every kernel in every dtype: vector
    and scalar, and for NCHW the rows kernel and the gather past its table."""
    monkeypatch.setenv("IDD_OPS_FORCE_INDEX64", "1")
    for K in (4, past_table(dtype)) if not channels_last else (4,):
        for C, H, W in [(8, 4, 4), (5, 3, 5)]:
            s = slots(2, H, W, K, blocky=False)
            grad = torch.randn(2, K, C, dtype=f64, generator=torch.Generator().manual_seed(1))
            assert torch.equal(ops._class_sums_backward(grad, s, dtype, channels_last),
                               CPU._class_sums_backward(grad, s, dtype, channels_last))


@pytest.mark.parametrize("channels_last,C,W,bad", [(False, 4, 8, 4), (False, 3, 7, -2), (True, 8, 5, 4),
                                                   (True, 3, 5, -5)],
                         ids=["nchw-vec-K", "nchw-scalar-minus2", "cl-vec-K", "cl-scalar-minus5"])
def test_class_sums_backward_slot_out_of_range(ops, channels_last, C, W, bad):
    s = slots(1, 3, W, 4)
    s[0, 2, 3] = bad
    grad = torch.randn(1, 4, C, dtype=f64)
    with pytest.raises(RuntimeError, match="slots: a value is outside"):
        ops._class_sums_backward(grad, s, f32, channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_class_sums_backward_copied_inputs(ops, channels_last):
    """grad_sums expanded (stride 0, as autograd passes a sum's gradient) and float32; slots at a
    storage offset (not aligned for the vector loads: cloned)."""
    s = slots(2, 4, 8, 4, blocky=False)
    s_off = torch.empty(s.numel() + 1, dtype=torch.int16)[1:].view(s.shape)
    s_off.copy_(s)
    grad = torch.randn(1, 4, 8).expand(2, 4, 8)
    assert torch.equal(ops._class_sums_backward(grad, s_off, f16, channels_last),
                       CPU._class_sums_backward(grad, s, f16, channels_last))


def test_class_sums_backward_empty(ops):
    grad = torch.randn(2, 4, 3, dtype=f64)
    s = torch.empty(2, 0, 5, dtype=torch.int16)
    got = ops._class_sums_backward(grad, s, f32, True)
    assert got.shape == (2, 3, 0, 5) and launches(ops) == []
