"""The class-slot map and the class-sum ops (_label_slots, class_sums, class_sums_pair,
_class_sums_backward) against the reference (token features: test_token_features.py)."""
import pytest
import torch

import idd_ops
from idd_ops import _switches, reference
from conftest import TOLERANCES, gradcheck, make_feats, make_labels
from test_centroids import SHAPES as CENTROID_SHAPES
from test_precision import offset_inputs

ops = torch.ops.idd_ops

# test_centroids' shapes, and one whose pixel count is a multiple of a 16-byte vector beside an
# odd channel count
SHAPES = CENTROID_SHAPES + [(1, 37, 5, 8, 5, 8, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _feats(B, C, H, W, dtype, device, layout, seed=0):
    return make_feats(B, C, H, W, dtype=dtype, device=device, seed=seed, channels_last=layout == "channels_last",
                      strided=layout == "strided")


@pytest.mark.parametrize("size,label_size", [((7, 9), (21, 27)), ((8, 8), (8, 8)), ((5, 3), (1, 1)),
                                             ((64, 128), (512, 1024)), ((33, 17), (7, 13))])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_slots_match_reference(device, size, label_size, label_dtype):
    y = make_labels(2, *label_size, 6, device=device)
    if label_dtype == torch.int16:
        y = y.to(label_dtype).transpose(1, 2).contiguous().transpose(1, 2)  # a strided view
    slots = ops._label_slots(y.to(label_dtype), *size, 6, 255)
    assert slots.dtype == torch.int16 and slots.shape == (2, *size)
    assert torch.equal(slots.long(), reference.label_slots(y, size, 6))


def test_label_slots_reject_bad_input():
    with pytest.raises(ValueError, match="labels: value 9"):
        ops._label_slots(torch.full((1, 4, 4), 9), 2, 2, 3, 255)
    with pytest.raises(ValueError, match="num_classes"):
        ops._label_slots(torch.zeros(1, 4, 4, dtype=torch.long), 2, 2, 40000, 255)
    with pytest.raises(TypeError, match="labels"):
        ops._label_slots(torch.zeros(1, 4, 4), 2, 2, 3, 255)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_class_sums_match_reference(device, shape, dtype, layout):
    B, C, H, W, Hy, Wy, K = shape
    x = _feats(B, C, H, W, dtype, device, layout)
    slots = ops._label_slots(make_labels(B, Hy, Wy, K, device=device), H, W, K, 255)
    weight = torch.randn(B, K, C, dtype=torch.float64, device=device)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
    sa, na = ops.class_sums(xa, slots, K)
    sb, nb = reference.class_sums(xb, slots, K)
    (sa.double() * weight).sum().backward()
    (sb * weight).sum().backward()
    tol = TOLERANCES[dtype]
    assert sa.dtype == torch.float64 and xa.grad.dtype == dtype  # float64 sums for every dtype
    assert torch.equal(na, nb)
    torch.testing.assert_close(sa.double(), sb, rtol=tol, atol=tol * max(1.0, float(sb.detach().abs().max())))
    torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=tol, atol=tol)
    if layout == "channels_last" and min(C, H * W) > 1:  # the gradient keeps the layout
        assert xa.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_class_sums_gradcheck(device, layout):
    x = _feats(2, 3, 5, 6, torch.float64, device, layout).requires_grad_()
    slots = ops._label_slots(make_labels(2, 15, 18, 4, device=device), 5, 6, 4, 255)
    assert gradcheck(lambda f: ops.class_sums(f, slots, 4)[0], (x,))


def test_class_sums_pair_equals_two_passes_and_routes_gradients(device):
    s = make_feats(2, 5, 8, 10, device=device, seed=1).requires_grad_()
    t = make_feats(2, 7, 4, 5, device=device, seed=2, channels_last=True).requires_grad_()
    y = make_labels(2, 16, 20, 6, device=device)
    ss, st = ops._label_slots(y, 8, 10, 6, 255), ops._label_slots(y, 4, 5, 6, 255)
    got = ops.class_sums_pair(s, ss, t, st, 6)
    want = ops.class_sums(s, ss, 6) + ops.class_sums(t, st, 6)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    (got[0].sum() + 2 * got[2].sum()).backward()
    valid_s, valid_t = (ss >= 0)[:, None].double(), (st >= 0)[:, None].double()
    torch.testing.assert_close(s.grad, valid_s.expand_as(s))
    torch.testing.assert_close(t.grad, 2 * valid_t.expand_as(t))


def test_pair_sums_of_a_detached_teacher_need_no_gradient(device):
    """IFVD's and IDD's one class pass for both networks: the teacher's sums stay out of the
    graph, so nothing downstream computes a teacher gradient (IFVD's teacher cosine backward,
    found by the emulator's traffic model: a third of the op's bytes)."""
    from idd_ops._class_sums import pair_sums

    s = make_feats(2, 5, 8, 10, device=device, seed=1).requires_grad_()
    t = make_feats(2, 7, 8, 10, device=device, seed=2)
    y = make_labels(2, 16, 20, 6, device=device)
    ss, ns, st, nt = pair_sums(s, t, y, 6, 255)
    assert ss.requires_grad and not st.requires_grad
    ss, _, st, _ = pair_sums(s.detach(), t.requires_grad_(), y, 6, 255)
    assert st.requires_grad and not ss.requires_grad


def test_ifvd_on_the_class_sum_path_computes_no_teacher_gradient(monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(_switches, "cpu_sums", True)
    s = make_feats(2, 5, 8, 10, seed=1).requires_grad_()
    loss = idd_ops.intra_class_variation_loss(s, make_feats(2, 7, 8, 10, seed=2), make_labels(2, 16, 20, 6), 6)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    # the slot-map cosine backward, or IFVD's loss backward where CUDA's calls its kernels directly
    # (the emulated next set): each takes the features second
    names = ("::_pixel_centroid_cosine_slots_backward", "::_ifvd_loss_backward")
    shapes = [e.input_shapes[1] for e in prof.events() if e.name.endswith(names)]
    assert shapes == [[2, 5, 8, 10]]  # one backward, the student's (5 channels)


def test_class_sums_are_the_same_bits_every_run(device):
    x = make_feats(2, 9, 24, 40, dtype=torch.float32, device=device)
    slots = ops._label_slots(make_labels(2, 24, 40, 19, device=device, blocky=False), 24, 40, 19, 255)
    first = ops.class_sums(x, slots, 19)[0]
    for _ in range(3):
        assert torch.equal(ops.class_sums(x, slots, 19)[0], first)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_sums_stay_accurate_under_a_large_offset(device, layout):
    """A common per-channel offset of 10^4 times the class spread: float32 sums stay within 1e-4
    (relative) of float64 ones (a chain of naive sequential additions would not)."""
    B, C, H, W, K = 2, 8, 128, 256, 3
    x = (1e4 + torch.randn(B, C, H, W, dtype=torch.float64)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(B, H, W, dtype=torch.long, device=device)
    y[:, :, W // 2:] = 1  # two long classes and a small one
    y[:, :4, :4] = 2
    slots = ops._label_slots(y, H, W, K, 255)
    s32, _ = ops.class_sums(x.float(), slots, K)
    s64, _ = ops.class_sums(x, slots, K)
    assert float(((s32.double() - s64).abs() / s64.abs()).max()) < 1e-4


@pytest.mark.parametrize("K", [150, 2048])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_class_sums_many_classes(device, K, layout):
    B, C, H, W = 2, 12, 20, 24
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (B, H, W), generator=g)
    y[:, 0, :3] = 255
    x = _feats(B, C, H, W, torch.float32, device, layout)
    slots = ops._label_slots(y.to(device), H, W, K, 255)
    sa, na = ops.class_sums(x, slots, K)
    sb, nb = reference.class_sums(x.double(), slots, K)
    assert torch.equal(na, nb)
    torch.testing.assert_close(sa.double(), sb, rtol=1e-5, atol=1e-5)


def test_class_sums_backward_matches_a_gather(device):
    B, C, H, W, K = 2, 5, 6, 7, 4
    slots = ops._label_slots(make_labels(B, H, W, K, device=device), H, W, K, 255)
    grad = torch.randn(B, K, C, dtype=torch.float64, device=device)
    padded = torch.cat([grad, torch.zeros(B, 1, C, dtype=grad.dtype, device=device)], 1)  # slot -1 -> row K
    idx = torch.where(slots < 0, K, slots.long()).reshape(B, 1, H * W).expand(B, C, H * W)
    want = torch.gather(padded.transpose(1, 2), 2, idx).reshape(B, C, H, W)
    for channels_last in (False, True):
        got = ops._class_sums_backward(grad, slots, torch.float64, channels_last)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_class_sums_backward_index64_path(monkeypatch, channels_last):
    """The 64-bit index path, forced at a small size, writes what the 32-bit one writes."""
    slots = ops._label_slots(make_labels(2, 12, 20, 5, device="cuda"), 12, 20, 5, 255)
    grad = torch.randn(2, 5, 16, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        narrow = ops._class_sums_backward(grad, slots, dtype, channels_last)
        monkeypatch.setenv("IDD_OPS_FORCE_INDEX64", "1")
        wide = ops._class_sums_backward(grad, slots, dtype, channels_last)
        monkeypatch.delenv("IDD_OPS_FORCE_INDEX64")
        assert torch.equal(narrow, wide)


def test_class_sums_reject_bad_input():
    x = torch.randn(1, 2, 4, 4)
    slots = ops._label_slots(torch.zeros(1, 4, 4, dtype=torch.long), 4, 4, 3, 255)
    with pytest.raises(TypeError, match="slots: expected int16"):
        ops.class_sums(x, slots.long(), 3)
    with pytest.raises(ValueError, match="slots: expected shape"):
        ops.class_sums(x, slots[:, :2], 3)
    with pytest.raises(ValueError, match="slots: value 2"):
        ops.class_sums(x, slots + 2, 2)
    with pytest.raises(ValueError, match="feats"):
        ops.class_sums(x[0], slots, 3)


def test_opcheck(device):
    x = make_feats(2, 3, 5, 6, dtype=torch.float32, device=device).requires_grad_()
    t = make_feats(2, 4, 5, 6, dtype=torch.float32, device=device, channels_last=True)
    y = make_labels(2, 10, 12, 4, device=device)
    slots = ops._label_slots(y, 5, 6, 4, 255)
    torch.library.opcheck(ops._label_slots.default, (y, 5, 6, 4, 255))
    torch.library.opcheck(ops.class_sums.default, (x, slots, 4))
    torch.library.opcheck(ops.class_sums_pair.default, (x, slots, t, slots, 4))


# ---- float64 sums at a common offset -------------------------------------------------
# class_sums returns float64 sums for every feature dtype; the kernels add x - pivot (a
# per-(image, channel) pivot) in float32 (float64 for float64) and count * pivot in float64, so
# at a common offset 10^4 times the class spread the sums stay within 1e-9 of the float64
# reference (float32 sums of the raw values are 1e-8 to 1e-6 off).

SUM_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _offset_case(dtype, device, layout, B=2, C=40, H=32, W=64, K=8, seed=0):
    """Features at a per-channel offset in [1e4, 2e4) with class means of spread 1 (in `dtype`),
    their slots, and the float64 reference sums and counts of exactly those values."""
    x, _, y, K = offset_inputs(1e4, 1.0, device, B=B, Cs=C, Ct=1, H=H, W=W, K=K, seed=seed)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    slots = ops._label_slots(y, H, W, K, 255)
    return x, slots, K, reference.class_sums(x.double(), slots, K)


def _assert_float64_sums(got, want):
    (s, n), (s_ref, n_ref) = got, want
    assert s.dtype == torch.float64 and n.dtype == torch.int64
    assert torch.equal(n, n_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=0.0)  # absent classes: exactly 0


@pytest.mark.parametrize("dtype", SUM_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_class_sums_are_float64_at_a_common_offset(device, dtype, layout):
    x, slots, K, want = _offset_case(dtype, device, layout)
    _assert_float64_sums(ops.class_sums(x, slots, K), want)


@pytest.mark.parametrize("dtype", SUM_DTYPES)
def test_class_sums_pair_is_float64_at_a_common_offset(device, dtype):
    """One launch (both NCHW, same dtype) and two (a float32 channels_last teacher)."""  # the second teacher
    s, slots_s, K, want_s = _offset_case(dtype, device, "contiguous", seed=1)
    for layout, t_dtype in (("contiguous", dtype), ("channels_last", torch.float32)):
        t, slots_t, _, want_t = _offset_case(t_dtype, device, layout, C=24, H=16, W=32, seed=2)
        got = ops.class_sums_pair(s, slots_s, t, slots_t, K)
        _assert_float64_sums(got[:2], want_s)
        _assert_float64_sums(got[2:], want_t)



# The CPU's channels_last pass splits the channels into blocks whose K rows fit 256 KiB
# (channel_block, class_sums_cpu.cpp): at K = 600 a block is 64 channels, so C = 150 takes three,
# the last one partial. Every other test kept C within one block, so writing each block's sums at
# channel 0 (its offset c0 dropped: mutation-checked) passed them all.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_sums_channels_last_past_one_channel_block(device, dtype):
    B, C, H, W, K = 2, 150, 6, 7, 600
    y = torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(0))
    y[:, 0, :2] = 255
    x = _feats(B, C, H, W, dtype, device, "channels_last")
    slots = ops._label_slots(y.to(device), H, W, K, 255)
    sa, na = ops.class_sums(x, slots, K)
    sb, nb = reference.class_sums(x.double(), slots, K)
    assert torch.equal(na, nb)
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-5)

# K = 5: P (NCHW) and L with 16-byte lanes; 150: W and L with a channel per lane; 400: W, and
# channels_last copied to NCHW (the CUDA strategies of class_sums_cuda.cu).
@pytest.mark.parametrize("K", [5, 150, 400])
def test_class_sums_layouts_agree_at_an_offset(device, K):
    x, slots, K, want = _offset_case(torch.float32, device, "contiguous", B=2, C=72, H=48, W=80, K=K)
    got_nchw = ops.class_sums(x, slots, K)
    got_last = ops.class_sums(x.contiguous(memory_format=torch.channels_last), slots, K)
    _assert_float64_sums(got_nchw, want)
    _assert_float64_sums(got_last, want)
    torch.testing.assert_close(got_last[0], got_nchw[0], rtol=2e-9, atol=0.0)


@pytest.mark.parametrize("K", [5, 150, 400])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_class_sums_same_bits_at_an_offset(device, layout, K):
    """Large enough to split the pixels into segments on a GPU (the combine launch), and the pair
    op in one launch: two runs give the same bits."""
    x, slots, K, _ = _offset_case(torch.float32, device, layout, B=2, C=16, H=96, W=160, K=K)
    first = ops.class_sums_pair(x, slots, x, slots, K)
    again = ops.class_sums_pair(x, slots, x, slots, K)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert torch.equal(first[0], first[2])


def _warp_sum_class_limit(dtype, warps):
    """The largest K whose class sums in W (warps x 2 channels of the accumulation dtype + an int
    count per class, csrc/cuda/class_sums_nchw.cuh) fit the GPU's opt-in shared memory per block."""
    optin = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("this torch does not report the opt-in shared memory per block")
    return optin // (warps * 2 * (8 if dtype == torch.float64 else 4) + 4)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_sums_with_fewer_warps_and_past_the_shared_memory_limit(dtype):
    """Past 4 (and 2) warps' sums the NCHW kernel takes fewer warps; past one warp's a clear error."""
    x, slots4, _, _ = _offset_case(dtype, "cuda", "contiguous", B=1, C=3, H=8, W=16, K=4)
    for warps in (4, 2, 1):
        K = min(_warp_sum_class_limit(dtype, warps) + (warps > 1), 32767)
        slots = torch.where(slots4 == 3, K - 1, slots4)  # the last slot is used
        _assert_float64_sums(ops.class_sums(x, slots, K), reference.class_sums(x.double(), slots, K))
    K = _warp_sum_class_limit(dtype, 1) + 1
    if K <= 32767:
        with pytest.raises(ValueError, match="num_classes"):
            ops.class_sums(x, slots4, K)


def test_cpu_default_path_is_switchable(monkeypatch):
    """The private switch routes the public functions; both paths give the reference's values."""
    s, t = make_feats(2, 4, 6, 8, seed=1), make_feats(2, 5, 6, 8, seed=2)
    y = make_labels(2, 12, 16, 4)
    want = reference.inter_class_distance_loss(s, t, y, 4)
    for on in (False, True):
        monkeypatch.setattr(_switches, "cpu_sums", on)
        assert _switches.class_sums_path(torch.device("cpu")) is on
        torch.testing.assert_close(idd_ops.inter_class_distance_loss(s, t, y, 4), want)
