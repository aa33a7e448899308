"""_ifvd_maps' CUDA kernels (csrc/cuda/ifvd_maps_cuda.cu: both centroid tables from the class
sums in one launch, both cosine maps in another) on the emulator of tests/cuda_emu, against the
op's ATen formulation on the CPU, and bit for bit against the default CUDA route it replaces (the
centroids divided apart, then the slot-map cosine kernels per network); and _ifvd_loss's (the
maps' launch adding the squared differences, the backward's factor pass forming the gradient map)
against the CPU op, the maps' own kernels and the cosine backward on mse_loss's backward."""
import pytest
import torch

from labels import CASES
from test_cuda_emulated import CPU, close, emu, kernels  # noqa: F401  (emu, kernels: fixtures)
from test_ifvd_maps import CASE_IDS, inputs

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("case", [c for c in CASES if c.id in CASE_IDS + ("uniform-runs", "ignored-warps")],
                         ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_the_cpu_op_and_the_route_it_replaces(kernels, case, dtype):
    args = inputs(case, dtype)
    want = CPU._ifvd_maps(*args, 1e-8)
    before = kernels._emu_launches()
    got = kernels._ifvd_maps(*args, 1e-8)
    assert kernels._emu_launches() - before == 2  # the tables, then both maps
    tol = TOLERANCE[dtype]
    close(got, want, rtol=tol, atol=tol)
    # the route it replaces: the centroids divided by ATen (into the maps' dtype), a cosine call each
    s, t, ss, st, ns, slots = args
    cs, ct = (torch.div(x, ns.clamp_min(1)[..., None], out=torch.empty(x.shape, dtype=got[0].dtype)) for x in (ss, st))
    route_s, route_fnorm = kernels._pixel_centroid_cosine_slots(s, cs, slots, 1e-8, ns)
    route_t = kernels._pixel_centroid_cosine_slots(t, ct, slots, 1e-8)[0]
    for a, b in ((got[0], route_s), (got[1], route_t), (got[2], route_fnorm), (got[3], cs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 0, 5, 3, 4), (2, 3, 0, 3, 4), (0, 3, 5, 3, 4), (2, 3, 5, 0, 4)],
                         ids=["student_without_channels", "teacher_without_channels", "no_images", "no_pixels"])
def test_empty_dimensions(kernels, shape):
    """No channels (norms 0, maps from the floored denominator), no images (no launch) and no
    pixels (the tables only): the CPU op's outputs, every one written."""
    B, Cs, Ct, H, W = shape
    K = 3
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(B, Cs, H, W, generator=g), torch.randn(B, Ct, H, W, generator=g)
    slots = torch.randint(-1, K, (B, H, W), generator=g, dtype=torch.int16)
    ss, ns, st, _ = CPU.class_sums_pair(s, slots, t, slots, K)
    before = kernels._emu_launches()
    got = kernels._ifvd_maps(s, t, ss, st, ns, slots, 1e-8)
    assert kernels._emu_launches() - before == (0 if B == 0 else 1 if H == 0 else 2)
    close(got, CPU._ifvd_maps(s, t, ss, st, ns, slots, 1e-8))


def test_many_small_images(kernels):
    """37 images of 6 pixels: one block a network and image, each writing its own image's maps."""
    g = torch.Generator().manual_seed(1)
    B, K = 37, 4
    s, t = torch.randn(B, 6, 2, 3, generator=g), torch.randn(B, 9, 2, 3, generator=g)
    slots = torch.randint(-1, K, (B, 2, 3), generator=g, dtype=torch.int16)
    ss, ns, st, _ = CPU.class_sums_pair(s, slots, t, slots, K)
    close(kernels._ifvd_maps(s, t, ss, st, ns, slots, 1e-8), CPU._ifvd_maps(s, t, ss, st, ns, slots, 1e-8))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in CASE_IDS + ("uniform-runs",)], ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_loss_matches_the_cpu_op_and_the_maps_kernels(kernels, case, dtype, mean):
    """Forward: the maps' two launches, their bits, and their squared differences added in float64.
    Backward: the slot-map cosine backward's launches but its table's (the forward's student
    table and norms, which the maps' route builds apart: the same bits), its factor pass forming
    the gradient map from the two maps: the bits of that backward on mse_loss_backward's map."""
    args = inputs(case, dtype)
    s, t, ss, st, ns, slots = args
    want = CPU._ifvd_loss(*args, 1e-8, mean)
    before = kernels._emu_launches()
    got = kernels._ifvd_loss(*args, 1e-8, mean)
    assert kernels._emu_launches() - before == 2
    tol = TOLERANCE[dtype]
    close(got, want, rtol=tol, atol=tol)
    maps = kernels._ifvd_maps(*args, 1e-8)
    assert all(torch.equal(a, b) for a, b in zip(got[1:4], maps[:3]))
    assert torch.equal(got[4], maps[3].transpose(1, 2))
    close(got[5], torch.linalg.vector_norm(maps[3].double(), dim=-1).to(got[5].dtype), rtol=tol, atol=tol)
    d = maps[0].double() - maps[1].double()
    squares = (d * d).sum() / (d.numel() if mean else 1)
    torch.testing.assert_close(got[0], squares.to(got[0].dtype), rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    grad = torch.tensor(0.7, dtype=got[0].dtype)
    before = kernels._emu_launches()
    grad_s = kernels._ifvd_loss_backward(grad, s, got[4], got[5], slots, got[1], got[2], got[3], ns, 1e-8, mean)
    launches = kernels._emu_launches() - before
    grad_map = torch.ops.aten.mse_loss_backward(grad, got[1], got[2], 1 if mean else 2)
    before = kernels._emu_launches()
    route = kernels._pixel_centroid_cosine_slots_backward(grad_map, s, maps[3], slots, got[1], got[3], 1e-8, ns)[0]
    assert launches == kernels._emu_launches() - before - 1  # the route's table
    assert torch.equal(grad_s, route)
    close(grad_s, CPU._ifvd_loss_backward(grad, s, want[4], want[5], slots, want[1], want[2], want[3], ns, 1e-8, mean),
          rtol=tol, atol=tol)


def test_loss_has_the_same_bits_whichever_blocks_come_last(kernels):
    """Tiles of 32 pixels over images strided by the grid's y: each tile's later block and the
    grid's last tile add in a fixed order, so every block order (the emulator's seed) and a second
    call (the tickets' counters left at 0) give the same bits."""
    g = torch.Generator().manual_seed(2)
    B, K = 5, 6
    s, t = torch.randn(B, 7, 9, 11, generator=g), torch.randn(B, 13, 9, 11, generator=g)
    slots = torch.randint(-1, K, (B, 9, 11), generator=g, dtype=torch.int16)
    ss, ns, st, _ = CPU.class_sums_pair(s, slots, t, slots, K)
    runs = []
    for seed in (3, 4, 5, 5):
        kernels._emu_configure(False, seed)
        runs.append(kernels._ifvd_loss(s, t, ss, st, ns, slots, 1e-8, True)[0])
    assert all(torch.equal(r, runs[0]) for r in runs)
    close(runs[0], CPU._ifvd_loss(s, t, ss, st, ns, slots, 1e-8, True)[0])


@pytest.mark.parametrize("shape", [(2, 3, 5, 0, 4), (0, 3, 5, 3, 4)], ids=["no_pixels", "no_images"])
def test_loss_of_no_pixels(kernels, shape):
    """0 (not mse_loss's 0/0), with the tables' launch alone where there are images."""
    B, Cs, Ct, H, W = shape
    K = 3
    s, t = torch.randn(B, Cs, H, W), torch.randn(B, Ct, H, W)
    slots = torch.zeros(B, H, W, dtype=torch.int16)
    ss, ns, st, _ = CPU.class_sums_pair(s, slots, t, slots, K)
    before = kernels._emu_launches()
    loss = kernels._ifvd_loss(s, t, ss, st, ns, slots, 1e-8, True)[0]
    assert kernels._emu_launches() - before == (0 if B == 0 else 1)
    assert loss.item() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ifvd_launches_on_each_set(reduction):
    """intra_class_variation_loss forward+backward on the emulated CUDA path: the next set's
    _ifvd_loss leaves no ATen op (mse_loss and its backward were ATen's) and no launch for the
    gradient map; the two sets' values and gradients agree."""
    import idd_ops
    from cuda_emu.override import emulated_cuda
    from cuda_emu.report import aten_ops

    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 8, 12, 20, generator=g), torch.randn(2, 24, 12, 20, generator=g)
    y = torch.randint(0, 6, (2, 48, 80), generator=g)
    y[:, :4] = 255
    seed = torch.ones(())
    results = []
    for kernel_set in ("default", "next"):
        with emulated_cuda(kernel_set) as emu:
            # a first call fills the stream's ticket counters, once: the second is the one counted
            idd_ops.intra_class_variation_loss(s.clone().requires_grad_(), t, y, 6, reduction=reduction).backward(seed)
            x = s.clone().requires_grad_()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                before = emu._emu_launches()
                loss = idd_ops.intra_class_variation_loss(x, t, y, 6, reduction=reduction)
                loss.backward(seed)
                launches = emu._emu_launches() - before
        results.append((loss.detach(), x.grad, launches, aten_ops(prof)))
    (want, want_grad, default_launches, default_aten), (got, got_grad, next_launches, next_aten) = results
    assert next_aten == {}, next_aten
    assert default_aten  # mse_loss and its backward, the centroids' divisions (11 at this revision)
    # the slot map, the class sums, the tables, the maps and loss, and the cosine backward's
    # factors (forming the loss's gradient map) and rows on the forward's student table; the
    # default set's 9 launches beside its ATen ops
    assert (next_launches, default_launches) == (6, 9)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * float(want_grad.abs().max()))
