"""_ifvd_maps' CUDA kernels (csrc/cuda/ifvd_maps_cuda.cu: both centroid tables from the class
sums in one launch, both cosine maps in another) on the emulator of tests/cuda_emu, against the
op's ATen formulation on the CPU, and bit for bit against the default CUDA route it replaces (the
centroids divided apart, then the slot-map cosine kernels per network)."""
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
