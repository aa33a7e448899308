import os

# cuBLAS repeats its results bit for bit only with a fixed workspace, and under
# torch.use_deterministic_algorithms(True) torch raises at any CUDA GEMM without one (the composite
# distance matrix's bmm, the batched SKD). torch reads the variable once, at the process's first
# GEMM, so it is set before anything runs. The library's users set it themselves, as for any GEMM
# in deterministic mode (docs/API.md).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# pytest-xdist workers share the cores (worker_threads below gives each at least 2 threads, so the
# CPU kernels' parallel paths run): OpenMP's threads then spin at every barrier while another
# worker holds the core, and the many small ops of a test wait ~10x longer (tests/test_fuzz.py: 89 s
# against 13 s on 2 cores). Threads that sleep instead cost microseconds a parallel region. OpenMP
# reads this as torch loads it, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# tools/gpu_check.sh exports the next kernel set's value for its benchmarks (IDD_OPS_NEXT_SET); the
# tests of the reports' labels expect the default, every group, whatever the check ran
os.environ.pop("IDD_OPS_NEXT_SET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

import idd_ops
from cuda_emu.override import KERNEL_SETS  # the set names only: the emulator builds on first use
# the hooks of IDD_OPS_TEST_LOG (tools/gpu_check.sh's per-test log), registered from here by name
from result_log import (pytest_collection_finish, pytest_runtest_logreport,  # noqa: F401
                        pytest_xdist_node_collection_finished)

# Every device-parametrised test has a cuda case: skipped without a GPU, run (and failing if the
# CUDA kernels were not built) where one is visible.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]
# tolerance against the float64 reference, per input dtype, of values and gradients alike: the
# tests use it as rtol and, times the largest expected magnitude, as atol
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs only where a GPU is visible (tools/gpu_check.sh selects these)")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    torch.set_num_threads(worker_threads(torch.get_num_threads(), workers, os.environ.get("OMP_NUM_THREADS")))
    if workers > 1 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # torch.compile tests compile inside their worker: inductor would otherwise start a pool of
        # compile processes in every worker, one per core, each importing torch (14 pools on the
        # GPU machine's 16 cores)
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1


def worker_threads(threads, workers, omp_num_threads=None, cores=None):
    """Torch's intra-op threads for one of `workers` pytest-xdist workers: its share of the cores,
    at least 2 (so the CPU kernels' parallel paths still run), never more than torch's own
    choice, and as OMP_NUM_THREADS says where it is set. Each worker otherwise takes a thread per
    core: 15 workers of 16 threads on the GPU machine's 16 cores, where the GPU tests' CPU
    references ran an order of magnitude slower than on their own."""
    if omp_num_threads or workers <= 1:
        return threads
    if cores is None:  # the cores this process may run on (affinity), else all of them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(threads, max(2, cores // workers))


# IDD_OPS_SLOW_FIRST=1 (tools/gpu_check.sh's test stages, with pytest-xdist handing out one test
# at a time): the tests that compile (torch.compile, opcheck's AOT checks, CUDA graph captures),
# seconds to tens of seconds each on a GPU machine's worker, run first, and the quick cases fill
# the workers around them. At the end of the list they ran last, on one or two workers, and the
# time limit of 2026-11-30 stopped them with no report. Otherwise the collection order stays.
SLOW_FIRST = os.environ.get("IDD_OPS_SLOW_FIRST") == "1"
SLOW_WORDS = ("compile", "opcheck", "graph")


def is_slow(item):
    return any(word in item.name.lower() for word in SLOW_WORDS)


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs a GPU: the cuda cases of device-parametrised tests and the
    tests skipped as 'needs a GPU'. With IDD_OPS_SLOW_FIRST=1, move the slow tests first."""
    for item in items:
        for prefix, (kernel_sets, kind, why) in EMULATED_CUDA_DIFFERENCES.items():
            if EMULATE_CUDA in kernel_sets and item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=why) if kind == "skip" else pytest.mark.xfail(reason=why))
        callspec = getattr(item, "callspec", None)
        on_cuda = callspec is not None and callspec.params.get("device") == "cuda"
        needs_gpu = any(m.kwargs.get("reason") == "needs a GPU" for m in item.iter_markers("skipif"))
        if on_cuda or needs_gpu:
            item.add_marker(pytest.mark.gpu)
    if SLOW_FIRST:
        items.sort(key=lambda item: not is_slow(item))  # stable: each group keeps its order


# IDD_OPS_EMULATE_CUDA=default (a kernel set of tests/cuda_emu/override.py): the CPU cases run the
# library's CUDA kernels instead of its CPU kernels, on the emulator of tests/cuda_emu, with the
# Python and composite paths switched as they are on CUDA. For the test files that check values
# through the public API (test_cuda_emulated.py lists them and runs them so).
EMULATE_CUDA = os.environ.get("IDD_OPS_EMULATE_CUDA", "")

# Where the CUDA kernels differ from the CPU ones by design (skipped under emulation), or by a
# known defect (expected to fail): test id prefix -> (kernel sets, "skip" or "xfail", why).
_DEVICE_ASSERT = "CUDA checks label and slot values by a device assert (a RuntimeError), not the CPU op's ValueError"
EMULATED_CUDA_DIFFERENCES = {
    "tests/test_baselines.py::test_bad_input[<lambda>-labels: value": (KERNEL_SETS, "skip", _DEVICE_ASSERT),
    "tests/test_centroids.py::test_counts_without_channels_and_unsigned_labels": (KERNEL_SETS, "skip",
                                                                                  _DEVICE_ASSERT),
    "tests/test_bad_input.py::test_bad_input[labels_too_big]": (KERNEL_SETS, "skip", _DEVICE_ASSERT),
    "tests/test_bad_input.py::test_bad_input[labels_negative]": (KERNEL_SETS, "skip", _DEVICE_ASSERT),
    "tests/test_bad_input.py::test_bad_input[centroid_labels_range]": (KERNEL_SETS, "skip", _DEVICE_ASSERT),
    "tests/test_class_sums.py::test_class_sums_reject_bad_input": (KERNEL_SETS, "skip", _DEVICE_ASSERT),
    "tests/test_class_sums.py::test_label_slots_reject_bad_input": (KERNEL_SETS, "skip", _DEVICE_ASSERT),
    "tests/test_cosine_slots.py::test_bad_slots_raise": (KERNEL_SETS, "skip", _DEVICE_ASSERT),
    "tests/test_baselines.py::test_skd_never_forms_the_pixel_affinity": (
        KERNEL_SETS, "skip", "a memory case (256x512 pixels at pool 1): emulated thread by thread it took 1.5 "
                              "min, and test_cuda_emulated_skd.py covers the kernels' grids"),
    "tests/test_class_sums.py::test_cpu_default_path_is_switchable": (KERNEL_SETS, "skip",
                                                                      "the CPU's path selection"),
    "tests/test_skd_formulations.py::test_the_variable_selects_the_formulation": (
        KERNEL_SETS, "skip", "the CPU's path selection (CUDA runs its fused kernels whatever the variable)"),
    "tests/test_cosine_slots.py::test_equals_the_labels_op": (KERNEL_SETS, "xfail",
                                                              "not bit for bit on CUDA: the labels backward adds "
                                                              "centroid gradients with float atomics, the slot forward "
                                                              "in 8 partial sums a pixel"),
    "tests/test_ifvd_maps.py::test_loss_is_the_mse_of_the_maps": (
        KERNEL_SETS, "skip", "CUDA's _ifvd_loss adds the squares in float64 (docs/ARCHITECTURE.md), not in "
                             "mse_loss's float32 order: not bit for bit (test_cuda_emulated_ifvd_maps.py holds it "
                             "to the CPU op within rounding)"),
    "tests/test_ifvd_maps.py::test_ifvd_takes_the_loss_op_for_mean_and_sum": (
        KERNEL_SETS, "skip", "CUDA's _ifvd_loss adds the squares in float64, not bit for bit with mse_loss"),
    "tests/test_training.py::test_cpu_autocast_bfloat16[skd]": (
        KERNEL_SETS, "xfail", "CUDA's SKD keeps bfloat16 GEMM operands (docs/ARCHITECTURE.md): 6.6e-4 of the loss "
                               "here, where the CPU's float32 operands meet the test's 1e-4"),
}


@pytest.fixture(autouse=True)
def _emulated_cuda():
    if not EMULATE_CUDA:
        yield
        return
    from cuda_emu.override import emulated_cuda

    with emulated_cuda(EMULATE_CUDA):
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def poisoned_empties():
    """Uninitialised tensors (torch.empty, and at::empty in the ops' host code) come filled with
    NaN, so an output element nothing writes shows: the deterministic mode's fill."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


@pytest.fixture
def one_thread():
    """One torch thread for the test (the demo's tests): their models are tiny, OpenMP barriers
    dominate with several threads, and on a busy machine they make a test minutes long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _synchronize_cuda():
    """Wait for the CUDA work of every test before it passes: an asynchronous kernel fault (an
    illegal address, a device-side assert) is then reported by the test that launched it, not by
    a later one. Free where CUDA was never initialised (the CPU suite)."""
    yield
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def gradcheck(fn, inputs, **kwargs):
    """torch.autograd.gradcheck: every input element on the CPU; in fast mode where an input is on
    CUDA (a random direction: one pair of forward calls instead of one per element, each a chain
    of small launches and a synchronise on a GPU; a wrong gradient kernel still fails it), with
    the reentrancy check allowing float64 atomics' last-bit differences. The CPU cases hold the
    math to the full Jacobian; the CUDA ones check the kernels."""
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    kwargs.setdefault("fast_mode", on_cuda)
    if on_cuda or EMULATE_CUDA:  # the centroid op's CUDA kernel adds with float atomics: two backward
        kwargs.setdefault("nondet_tol", 1e-10)  # passes differ in the last bits (emulated: blocks run shuffled)
    return torch.autograd.gradcheck(fn, inputs, **kwargs)


def assert_devices_agree(loss_of, x, device, tol):
    """loss_of(x on a device) and its gradient w.r.t. x, on the CPU and on `device`, agree: the
    loss within relative `tol`, the gradient within `tol` of its largest element. Skipped where
    `device` is the CPU (the CPU against itself could not fail)."""
    if torch.device(device).type == "cpu":
        pytest.skip("compares the CPU op with another device's")
    results = []
    for where in ("cpu", device):
        leaf = x.to(where).requires_grad_()
        loss = loss_of(leaf)
        loss.backward()
        results.append((loss.detach().cpu(), leaf.grad.cpu()))
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    torch.testing.assert_close(got_grad.double(), want_grad.double(), rtol=tol,
                               atol=tol * float(want_grad.double().abs().max()))


def make_labels(B, H, W, K, device="cpu", ignore_frac=0.1, blocky=True, seed=0, dtype=torch.int64):
    """Piecewise-constant labels (blocks of random classes) with a share of ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    if blocky:
        coarse = torch.randint(0, K, (B, max(1, H // 4), max(1, W // 4)), generator=g)
        y = torch.nn.functional.interpolate(coarse[:, None].double(), size=(H, W), mode="nearest")[:, 0].long()
    else:
        y = torch.randint(0, K, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < ignore_frac] = 255
    return y.to(dtype=dtype, device=device)


def make_feats(B, C, H, W, dtype=torch.float64, device="cpu", seed=0, channels_last=False, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a non-contiguous view: every other channel of a wider tensor
        x = torch.randn(B, 2 * C, H, W, generator=g, dtype=torch.float64)[:, ::2]
    else:
        x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pytest_sessionfinish(session, exitstatus):
    if EMULATE_CUDA and os.environ.get("IDD_OPS_EMULATE_PROFILE"):
        import sys

        if "cuda_emu.build" in sys.modules and sys.modules["cuda_emu.build"]._LOADED:
            print("\nemulated launches (site, count, seconds):\n" + torch.ops.idd_ops_emu._emu_profile())
