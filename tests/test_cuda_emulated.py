"""The library's CUDA kernels, run on the CPU by the emulator of tests/cuda_emu (no GPU needed):
every CUDA op against the CPU op of the same name, which the rest of the suite checks against the float64 reference.

The emulator runs each block's threads as fibers in a shuffled order, poisons shared memory, and
raises on a barrier not every thread reaches, an over-sized launch or a device assert, so these
tests catch indexing, reduction and synchronisation errors; not timing, and not the GPU's own
float rounding (the tolerances are those of a different summation order). The emulated library
is built on first use (about 1-2 minutes on 2 cores, then cached in build/cuda_emu).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import idd_ops  # noqa: F401
from cuda_emu.override import KERNEL_SETS

CPU = torch.ops.idd_ops
K = 7


@pytest.fixture(scope="module")
def emu():
    from cuda_emu import build

    return build.load()


@pytest.fixture
def kernels(emu):
    """The emulated ops with the default CUDA kernel set selected, and a seed for the order of
    blocks and threads."""
    emu._emu_configure(False, 7)
    return emu


def close(got, want, rtol=1e-5, atol=1e-5):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            close(g, w, rtol, atol)
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    if not want.is_floating_point():
        assert torch.equal(got, want)
        return
    assert torch.isfinite(got).all() == torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, float(want.abs().max())) if want.numel() else atol)


def slot_counts(slots, K):
    """[B, K] int64 pixels of each class in a slot map (the counts of the centroids' own classes)."""
    return torch.nn.functional.one_hot(slots.long().flatten(1) + 1, K + 1)[..., 1:].sum(1)


def labels(B, Hy, Wy, num_classes=K, seed=0, ignore=0.1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (B, Hy, Wy), generator=g)
    y[torch.rand(B, Hy, Wy, generator=g) < ignore] = 255
    return y


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_translation_keeps_every_line_number(tmp_path):
    """The emulator's sources keep each line where csrc/cuda has it (launch sites, compiler
    messages and the coverage report name source lines): the same number of lines, every kernel
    and device function declared on its own line, and only the rewritten statements differ."""
    from cuda_emu import build

    build.translate(tmp_path)
    for src in sorted((build.CSRC / "cuda").iterdir()):
        out = tmp_path / "cuda" / (src.stem + ".cpp" if src.suffix == ".cu" else src.name)
        want, got = src.read_text().splitlines(), out.read_text().splitlines()
        if got[:2] == ["#include <emu_registry.h>", "#line 1"]:
            got = got[2:]
        assert len(got) == len(want), src.name
        declared = [i + 1 for i, w in enumerate(want) if ("__global__" in w or "__device__" in w)
                    and got[i] != w and "EMU_" not in got[i]]
        assert not declared, f"{src.name}: lines {declared[:5]} moved"
        assert sum(g != w for g, w in zip(got, want)) < len(want) // 5, src.name


def test_coverage_report_names_what_no_test_reaches():
    """tests/cuda_emu/coverage.py on made-up counts for csrc/cuda/label_slots_cuda.cu: the kernel
    (lines 15-23) is device code, a device line never run and a branch never taken are named, an
    instance never run is listed once, host lines are counted without their branches."""
    from collections import defaultdict

    from cuda_emu import coverage

    text = (coverage.ROOT / "csrc/cuda/label_slots_cuda.cu").read_text()
    assert set(range(15, 24)) <= coverage.device_lines(text) and 25 not in coverage.device_lines(text)
    lines = defaultdict(lambda: [0, defaultdict(set)])
    lines[17][0] = 4
    lines[18][0], lines[18][1][2] = 8, {0}     # the loop's exit never taken
    lines[21][0] = 0                           # never run
    lines[30][0], lines[30][1][4] = 1, set()   # host: branches not counted
    instances = {(15, "label_slots_kernel_impl<uint8_t>"): False, (15, "label_slots_kernel_impl<int64_t>"): True}
    md = coverage.report({"csrc/cuda/label_slots_cuda.cu": (lines, instances)}, "pytest x")
    row = next(r for r in md.splitlines() if r.startswith("| csrc/cuda/label_slots_cuda.cu"))
    assert row == "| csrc/cuda/label_slots_cuda.cu | 2 / 3 (67 %) | 1 / 2 (50 %) | 1 / 1 (100 %) | 1 |"
    assert "- device line never run, 21: `slots[e] = static_cast<int16_t>(pixel_class(" in md
    assert "- device branch never taken, 18 (1 of 2 arcs): `for (int64_t e = blockIdx.x" in md
    assert md.count("instance never run") == 1 and "label_slots_kernel_impl<uint8_t>" in md
    assert coverage.ranges([7, 1, 2, 3]) == [(1, 3), (7, 7)]


@pytest.mark.parametrize("size", [(16, 20, 32, 40), (9, 13, 18, 26), (12, 12, 7, 5)])
def test_label_slots(kernels, size):
    H, W, Hy, Wy = size
    y = labels(2, Hy, Wy)
    assert torch.equal(kernels._label_slots(y, H, W, K, 255), CPU._label_slots(y, H, W, K, 255))


def test_label_slots_past_one_grid(emu, poisoned_empties):
    """The slots kernel launches at most 65535 blocks of 256 threads (blocks_for): past
    65535 * 256 pixels its grid-stride loop writes the rest (uninitialised, NaN-filled, else)."""
    emu._emu_configure(False, 7)
    y = labels(1, 61, 67)
    H, W = 4099, 4096  # 16,789,504 pixels: 12,544 past one grid
    assert H * W > 65535 * 256
    got = emu._label_slots(y, H, W, K, 255)
    assert torch.equal(got, CPU._label_slots(y, H, W, K, 255))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("num_classes", [K, 300])
def test_class_sums(kernels, layout, num_classes):
    x = randn(2, 24, 16, 20)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    slots = CPU._label_slots(labels(2, 32, 40, num_classes), 16, 20, num_classes, 255)
    close(kernels.class_sums(x, slots, num_classes), CPU.class_sums(x, slots, num_classes))


def test_class_sums_pair(kernels):
    a, b = randn(2, 24, 16, 20), randn(2, 40, 16, 20, seed=1)
    slots = CPU._label_slots(labels(2, 32, 40), 16, 20, K, 255)
    close(kernels.class_sums_pair(a, slots, b, slots, K), CPU.class_sums_pair(a, slots, b, slots, K))


@pytest.mark.parametrize("channels_last", [False, True])
def test_class_sums_backward(kernels, channels_last):
    slots = CPU._label_slots(labels(2, 32, 40), 16, 20, K, 255)
    grad = randn(2, K, 24, dtype=torch.float64)
    args = (grad, slots, torch.float32, channels_last)
    close(kernels._class_sums_backward(*args), CPU._class_sums_backward(*args))


def test_class_centroids(kernels):
    x, y = randn(2, 24, 16, 20), labels(2, 32, 40)
    close(kernels.class_centroids(x, y, K, 255), CPU.class_centroids(x, y, K, 255))
    _, counts = CPU.class_centroids(x, y, K, 255)
    args = (randn(2, K, 24, seed=1), y, counts, 16, 20, torch.float32, 255)
    close(kernels._class_centroids_backward(*args), CPU._class_centroids_backward(*args))


def test_class_centroids_past_one_grid_of_channel_tiles(kernels):
    """The centroid kernel's channel tiles (8 channels a block) lie along grid y, which holds 65535
    blocks: past 8 * 65535 channels the host launches again for the rest, and the first launch
    alone writes the counts. One launch failed there ("invalid configuration argument")."""
    C = 8 * 65535 + 9
    x, y = randn(1, C, 1, 3), torch.tensor([[[0, 255, 1]]])
    kernels._emu_launch_log()
    got = kernels.class_centroids(x, y, 2, 255)
    assert kernels._emu_launch_log()[0::3] == [65535, 2]  # blocks of each launch
    close(got, CPU.class_centroids(x, y, 2, 255))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_idd_tail(kernels, metric, normalize, reduction):
    slots = CPU._label_slots(labels(2, 32, 40), 16, 20, K, 255)
    ss, sc = CPU.class_sums(randn(2, 24, 16, 20), slots, K)
    ts, tc = CPU.class_sums(randn(2, 40, 16, 20, seed=1), slots, K)
    args = (ss, sc, ts, tc, metric, normalize, 1e-8, reduction, torch.float32)
    got, want = kernels.idd_tail(*args), CPU.idd_tail(*args)
    close(got[:2], want[:2])
    # stats: row K holds the image's values (rows 0..K-1 are the CUDA kernel's own partials);
    # Q (column 6) is computed, and read by the backward, only under normalize.
    stat_cols = slice(None) if normalize else [0, 1, 2, 3, 4, 5, 7]
    close(got[2][:, K, stat_cols], want[2][:, K, stat_cols])
    grad = torch.rand_like(want[0]) + 0.5
    tail = (metric, normalize, 1e-8, reduction)
    close(kernels._idd_tail_backward(grad, ss, sc, tc, got[1], got[2], *tail),
          CPU._idd_tail_backward(grad, ss, sc, tc, want[1], want[2], *tail))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("H, W", [(16, 20), (1, 20), (16, 1)])
def test_position_encoding_loss(kernels, reduction, H, W):
    """A map of one row or one column: that axis's coordinate is 0 (no division by n - 1 = 0)."""
    pred = torch.rand(2, 5, H, W, generator=torch.Generator().manual_seed(0))
    spec = ([0, 1, 2, 3, 4], [0.0, 0.0, 0.5, 4.0, 4.0])
    close(kernels.position_encoding_loss(pred, *spec, reduction), CPU.position_encoding_loss(pred, *spec, reduction))
    grad = torch.tensor(1.0) if reduction == "mean" else randn(2, 5, H, W)
    close(kernels._position_encoding_loss_backward(grad, pred, *spec, reduction),
          CPU._position_encoding_loss_backward(grad, pred, *spec, reduction))


@pytest.mark.parametrize("shape", [(4, 19, 300), (64, 37, 1), (8, 512, 3)])
def test_softmax_kl(kernels, shape):
    s, t = randn(*shape), randn(*shape, seed=1)
    close(kernels.softmax_kl(s, t, 2.0), CPU.softmax_kl(s, t, 2.0))
    kl, lse_s, lse_t = CPU.softmax_kl(s, t, 2.0)
    grad = randn(*kl.shape, seed=2)
    close(kernels._softmax_kl_backward(grad, s, t, lse_s, lse_t, 2.0),
          CPU._softmax_kl_backward(grad, s, t, lse_s, lse_t, 2.0))


def test_pixel_centroid_cosine(kernels):
    x, y, cent = randn(2, 24, 16, 20), labels(2, 32, 40), randn(2, K, 24, seed=1)
    close(kernels.pixel_centroid_cosine(x, cent, y, 255, 1e-8), CPU.pixel_centroid_cosine(x, cent, y, 255, 1e-8))
    cos, norms = CPU.pixel_centroid_cosine(x, cent, y, 255, 1e-8)
    args = (randn(2, 16, 20, seed=2), x, cent, y, cos, norms, 255, 1e-8)
    close(kernels._pixel_centroid_cosine_backward(*args), CPU._pixel_centroid_cosine_backward(*args), atol=1e-4)


# (B, C, H, W): whole 32-pixel forward blocks and every channel group busy; then a last block
# part past HW, and fewer channels than the forward block's 8 channel groups.
@pytest.mark.parametrize("shape", [(2, 24, 16, 20), (3, 5, 7, 9)])
def test_pixel_centroid_cosine_slots(kernels, shape):
    B, C, H, W = shape
    x, cent = randn(B, C, H, W), randn(B, K, C, seed=1)
    slots = CPU._label_slots(labels(B, 2 * H, 2 * W), H, W, K, 255)
    close(kernels._pixel_centroid_cosine_slots(x, cent, slots, 1e-8), CPU._pixel_centroid_cosine_slots(x, cent, slots, 1e-8))
    cos, norms = CPU._pixel_centroid_cosine_slots(x, cent, slots, 1e-8)
    args = (randn(B, H, W, seed=2), x, cent, slots, cos, norms, 1e-8)
    for own in ((), (slot_counts(slots, K),)):  # independent centroids, then feats' own (the rows' second walk)
        close(kernels._pixel_centroid_cosine_slots_backward(*args, *own),
              CPU._pixel_centroid_cosine_slots_backward(*args, *own), atol=1e-4)


def test_emulator_runs_a_correct_reduction(emu):
    x = torch.arange(1.0, 201.0)
    assert emu._emu_selftest("block_sum", x)[0].item() == x.sum().item()


def test_orders_follow_the_seed_not_what_ran_before(emu):
    """Block and thread orders come from the seed and the launches since the last configure, so a
    call configured again gives the same bits whatever ran before (a fuzzer's --repro shows what a
    long run saw: the centroid op's float atomics round by the order), and another
    seed gives another order."""
    x, y = randn(2, 24, 16, 20) + 3.0, labels(2, 32, 40)

    def centroids(seed, launches_before=0):
        for _ in range(launches_before):
            emu.class_centroids(randn(1, 8, 4, 4), labels(1, 4, 4), K, 255)
        emu._emu_configure(False, seed)
        return emu.class_centroids(x, y, K, 255)[0]

    first = centroids(3)
    assert torch.equal(centroids(3, launches_before=3), first)
    assert not torch.equal(centroids(4), first)


def test_emulator_exposes_a_missing_barrier_and_unwritten_shared_memory(emu):
    """Threads run in a shuffled order between barriers, and shared memory starts as NaN: a
    kernel that reads before the others wrote gets wrong values."""
    x = torch.arange(1.0, 201.0)
    want = torch.cat([x, torch.zeros(56)]).roll(-1)
    assert (emu._emu_selftest("missing_barrier", x) != want).sum() > 50
    assert emu._emu_selftest("unwritten_shared", x).isnan().all()


def test_new_allocations_come_poisoned(emu):
    """While the emulator is loaded, fresh CPU storage is all 0xFF bytes (redzone_allocator.cpp):
    an output element no kernel writes reads as NaN (or -1), in every test."""
    assert torch.empty(5).isnan().all() and torch.empty(3, dtype=torch.bfloat16).isnan().all()
    assert (torch.empty(4, dtype=torch.int64) == -1).all()


@pytest.mark.parametrize("name, message", [
    ("divergent_barrier", "deadlocks"),
    ("shuffle_from_exited_lane", "names lane 16, which has exited"),
    ("failing_assert", "device assert failed: x\\[threadIdx.x\\] < 0"),
    ("too_many_threads", "a block of 2048 threads"),
    ("too_much_shared", "65536 bytes of dynamic shared memory"),
    ("static_and_dynamic_shared", "32768 bytes of static and 20480 of dynamic shared memory"),
    ("read_past_the_end", "reads 4 bytes at offset 1024 of a 1024-byte allocation \\(0 bytes past its end\\)"),
    ("read_before_the_start", "reads 4 bytes at offset -4 of a 1024-byte allocation \\(4 bytes before its start\\)"),
])
def test_emulator_raises_what_a_gpu_would_fault_on(emu, name, message):
    with pytest.raises(RuntimeError, match=message):
        emu._emu_selftest(name, torch.arange(1.0, 257.0))


def test_emulator_allows_static_and_dynamic_shared_memory_once_opted_in(emu):
    x = torch.arange(1.0, 257.0)
    torch.testing.assert_close(emu._emu_selftest("static_and_dynamic_shared_opted_in", x), x + 1)


# Value and gradient tests of the public API whose CPU cases run through the CUDA kernels when
# IDD_OPS_EMULATE_CUDA is set (tests/conftest.py): IDD, the baselines (pixel KD, CWD, SKD, IFVD)
# and the position loss, and NaN features through IDD. Any test file can be run so; these are the
# ones CI runs.
API_TESTS = ["tests/test_idd_loss.py", "tests/test_baselines.py", "tests/test_position.py",
             "tests/test_bad_input.py::test_nan_features_propagate_not_crash",
             "tests/test_api.py::test_pixel_kd_mask_follows_the_kernels_label_resize"]


@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
def test_public_api_on_emulated_cuda(emu, kernel_set):
    """The losses through the Python API, autograd and the CUDA path selection, on the emulated
    CUDA kernels of one set, in a child process (a few minutes each on 2 cores)."""
    env = dict(os.environ, IDD_OPS_EMULATE_CUDA=kernel_set)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *API_TESTS], cwd=root,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
