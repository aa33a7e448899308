"""The ops under the CUDA runtime's conditions: the zero-count guard, a side stream, CUDA graph
capture and replay, a second device, the shared-memory limit, bfloat16 at C = 2048 and IFVD
under deterministic mode. The device-parametrised tests run their CPU half everywhere."""
import warnings

import pytest
import torch

import idd_ops
from idd_ops import _switches, reference
from conftest import make_feats, make_labels
from op_calls import CALLS, KINDS, OPS

ops = torch.ops.idd_ops
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def poison_free_memory(device, nbytes=256 << 20):
    """Leave NaN in the caching allocator's free blocks of the current stream (large and small
    pools): an output element that a kernel does not write then reads as NaN."""
    chunks = [torch.full((nbytes // 4,), float("nan"), device=device)]
    chunks += [torch.full((64 << 10,), float("nan"), device=device) for _ in range(64)]  # 256 KiB each
    del chunks


def _same(got, want, rtol=1e-5, atol=1e-6):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# --- the zero-count guard -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_centroid_backward_is_zero_where_count_is_zero(device, dtype):
    """counts handed to the backward directly may be 0 for a class the labels hold: its pixels get
    gradient 0 (not inf or NaN), on every device alike."""
    B, K, C, H, W = 2, 4, 3, 5, 7
    y = make_labels(B, H, W, K, ignore_frac=0.2, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_c = torch.randn(B, K, C, dtype=acc, generator=torch.Generator().manual_seed(0)).to(device)
    counts = torch.tensor([[0, 3, 1, 0], [2, 0, 4, 5]], device=device)
    got = ops._class_centroids_backward(grad_c, y, counts, H, W, dtype, 255)
    slot = torch.where(y == 255, K, y).cpu()
    per_class = torch.cat([grad_c.cpu() / counts.cpu().clamp_min(1)[..., None] * (counts.cpu() > 0)[..., None],
                           torch.zeros(B, 1, C, dtype=acc)], 1)  # [B, K + 1, C], row K: ignored
    want = torch.gather(per_class, 1, slot.view(B, -1, 1).expand(-1, -1, C)).transpose(1, 2).reshape(B, C, H, W)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu().double(), want.to(dtype).double(), rtol=0, atol=0)
    if device != "cpu":
        torch.testing.assert_close(got.cpu(), ops._class_centroids_backward(
            grad_c.cpu(), y.cpu(), counts.cpu(), H, W, dtype, 255), rtol=0, atol=0)


# --- streams, graphs, devices ---------------------------------------------------------------------

def test_op_inputs_are_fresh_leaves():
    """Each OPS call gets its own leaf inputs and leaves the shared ones alone: once a CPU call
    marked them as needing grad, a later CUDA copy was no leaf, its .grad None, and the stream
    test's comparison failed on whichever op a worker had run on the CPU before (H200, cceb8c3)."""
    for name, make in OPS.items():
        inputs, _ = make("cpu")
        assert inputs[0].is_leaf and inputs[0].requires_grad, name
        assert not any(t.requires_grad for t in CALLS[name][0]), name


@needs_gpu
@pytest.mark.parametrize("name", sorted(OPS))
def test_side_stream_equals_default_stream(name):
    """On a side stream held back by a sleep, the inputs are written after the sleep: a kernel
    launched on another stream than the current one would read them unwritten (NaN)."""
    base, run = OPS[name]("cuda")
    want = run(*base)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        poison_free_memory("cuda")
        torch.cuda._sleep(20_000_000)
        inputs = [t.detach().clone() for t in base]
        inputs[0].requires_grad_()
        got = run(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    _same(got, want)


def capture(run, static):
    """run(*static) captured in a CUDA graph, after two warm-up calls off the default stream (as
    torch.cuda.graphs asks): (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static[0].grad = None
    with torch.cuda.graph(graph):
        captured = run(*static)
    return graph, captured


@needs_gpu
@pytest.mark.parametrize("name", sorted(OPS))
def test_cuda_graph_replay_equals_eager(name):
    """Forward and backward captured in a CUDA graph, replayed on new input values (labels
    included), equal the eager call on those values."""
    static, run = OPS[name]("cuda")
    graph, captured = capture(run, static)
    fresh, _ = OPS[name]("cpu")
    with torch.no_grad():
        for s, f in zip(static, fresh):
            s.copy_(f.flip(-1) if f.dim() > 1 else f)  # new values, same shapes and dtypes
    graph.replay()
    torch.cuda.synchronize()
    eager_inputs = [s.detach().clone() for s in static]
    eager_inputs[0].requires_grad_()
    _same([t.clone() for t in captured], run(*eager_inputs))


@needs_gpu
@pytest.mark.parametrize("name", ["idd_loss", "pixel_kd", "ifvd", "class_centroids", "skd"])
def test_last_block_counters_across_streams_and_graphs(name):
    """The kernels whose grid's last block finishes its work (grid_tickets.cuh: the IDD tail's
    one-pass kernel, pixel KD's sum, IFVD's loss, the class sums' segments, which these shapes
    split on a GPU of 132 SMs, and SKD's Gram tail, each image's mean and the batch's sum, behind
    IDD_OPS_CUDA_NEXT; the other calls here run the default kernels the same way) keep ticket
    counters per stream, which each launch leaves at 0: calls on two streams at once (each held
    back by a sleep, so that their kernels overlap), a captured graph replayed between eager calls
    on one stream, and a call after all of them give the eager values."""
    base, run = OPS[name]("cuda")
    want = [t.clone() for t in run(*base)]

    def fresh():
        inputs = [t.detach().clone() for t in base]
        inputs[0].requires_grad_()
        return inputs

    streams = [torch.cuda.Stream() for _ in range(2)]
    results = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for stream in streams:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(5_000_000)
            results.append([t.clone() for t in run(*fresh())])
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    for got in results:
        _same(got, want)

    graph, captured = capture(run, fresh())
    for _ in range(2):
        graph.replay()
        _same([t.clone() for t in captured], want)
        _same(run(*fresh()), want)
    _same(run(*fresh()), want)


@needs_gpu
@pytest.mark.parametrize("name", ["idd_loss", "pixel_kd", "ifvd", "position_loss mean", "class_centroids", "skd"])
def test_last_block_counters_on_per_thread_default_streams(name):
    """Two host threads on the per-thread default stream, whose one handle (cudaStreamPerThread,
    0x2) is a stream of each thread's own: their forwards overlap (each held back by a sleep), and
    the last-block ticket counters (grid_tickets.cuh; kept per thread for that handle, where the
    kernels take them) give each the value on the current stream. Forward only: a backward runs on
    autograd's own thread. Each thread allocates from a memory pool of its own: the caching
    allocator, which keys freed blocks on the stream handle too, would otherwise hand one thread's
    freed scratch memory to the other while the first one's kernels still wait behind the sleep."""
    import threading

    if not hasattr(torch.cuda, "use_mem_pool"):
        pytest.skip("needs torch.cuda.use_mem_pool (per-thread memory pools)")
    if name == "position_loss mean":  # CALLS' position loss is "none", which takes no ticket
        inputs, forward = CALLS["position_loss"][0], lambda p: idd_ops.position_encoding_loss(p, KINDS)
    else:
        inputs, forward = CALLS[name]
    inputs = [t.cuda() for t in inputs]
    with torch.no_grad():
        want = forward(*inputs)
    torch.cuda.synchronize()
    results, errors = [None, None], []
    pools = [torch.cuda.MemPool() for _ in range(2)]

    def work(i):
        try:
            with torch.no_grad(), torch.cuda.use_mem_pool(pools[i]), \
                    torch.cuda.stream(torch.cuda.ExternalStream(0x2)):
                torch.cuda._sleep(5_000_000)
                results[i] = forward(*inputs).clone()
                torch.cuda.current_stream().synchronize()
        except Exception as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results:
        _same([got], [want])
    results.clear()  # the pools' blocks freed before the pools go
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", sorted(OPS))
def test_second_device(name):
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device guards), the
    results equal cuda:0's, and the current device is left as it was."""
    inputs0, run = OPS[name]("cuda:0")
    inputs1, _ = OPS[name]("cuda:1")
    torch.cuda.set_device(0)
    want = run(*inputs0)
    got = run(*inputs1)
    assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda:1") for t in got)
    torch.cuda.synchronize(1)
    _same([t.to("cuda:0") for t in got], want)


# --- the shared-memory limit ----------------------------------------------------------------------

def _centroid_class_limit(dtype):
    """The largest K whose per-class sums (8 channels of the accumulation dtype + an int64 count
    per class, csrc/cuda/class_centroids_cuda.cu) fit the GPU's opt-in shared memory per block."""
    optin = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("this torch does not report the opt-in shared memory per block")
    acc_bytes = 8 if dtype == torch.float64 else 4
    return optin // (8 * acc_bytes + 8)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centroids_at_and_past_the_shared_memory_limit(dtype):
    K = _centroid_class_limit(dtype)
    x = make_feats(1, 9, 8, 16, dtype=dtype, device="cuda")
    y = make_labels(1, 8, 16, 4, device="cuda")
    y = torch.where(y == 3, K - 1, y)  # the last class slot is used
    c, n = idd_ops.class_centroids(x, y, K)
    c_ref, n_ref = reference.class_centroids(x.double(), y, K)
    assert torch.equal(n, n_ref)
    torch.testing.assert_close(c.double(), c_ref, rtol=1e-6, atol=1e-6)
    if _switches.class_sums_path(x.device):
        # the class-sum path needs at least 12 (float64: 20) bytes of shared
        # memory a class, the centroid kernel 40 (72) (csrc/cuda/class_sums_cuda.cu): K + 1 fits
        c, n = idd_ops.class_centroids(x, y, K + 1)
        assert torch.equal(n[:, :K], n_ref) and not n[:, K].any()
        torch.testing.assert_close(c[:, :K].double(), c_ref, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(idd_ops.intra_class_variation_loss(x, x, y, K + 1))
        return
    with pytest.raises(ValueError, match="num_classes"):
        idd_ops.class_centroids(x, y, K + 1)
    with pytest.raises(ValueError, match="num_classes"):
        idd_ops.intra_class_variation_loss(x, x, y, K + 1)


MAX_SLOT_CLASSES = 32767  # _label_slots' int16 slots (csrc/common/label_index.h)


def _cosine_backward(K, dtype, slots_op, device):
    """The IFVD cosine backward at K classes (through the labels or the slots op) on `device`;
    the inputs are built on the CPU from one seed, so every device gets the same values."""
    x = make_feats(1, 3, 4, 4, dtype=dtype)
    y = make_labels(1, 4, 4, 2)
    y = torch.where(y == 1, K - 1, y).to(device)  # the last class slot is used
    x, cent = x.to(device), torch.randn(1, K, 3, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    cos, norm = ops.pixel_centroid_cosine(x, cent, y, 255, 1e-8)
    if slots_op:
        slots = ops._label_slots(y, 4, 4, K, 255)
        return ops._pixel_centroid_cosine_slots_backward(torch.ones_like(cos), x, cent, slots, cos, norm, 1e-8)
    return ops._pixel_centroid_cosine_backward(torch.ones_like(cos), x, cent, y, cos, norm, 255, 1e-8)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_backward_at_and_past_the_shared_memory_limit(dtype):
    """The labels kernel keeps K class sums in shared memory: past 48 KiB it opts in to more, and
    past the GPU's opt-in limit it raises a ValueError naming num_classes. The slot kernel
    has no such limit (past 48 KiB it adds into grad_centroids directly), but
    its int16 class slots hold at most 32767 classes: past that, _label_slots raises the same
    ValueError (float32's opt-in K on an H200 is 58112)."""
    optin = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("this torch does not report the opt-in shared memory per block")
    acc_bytes = 8 if dtype == torch.float64 else 4
    for K in (48 * 1024 // acc_bytes + 1, optin // acc_bytes, optin // acc_bytes + 1):
        for slots_op in (False, True):
            if (K > optin // acc_bytes and not slots_op) or (K > MAX_SLOT_CLASSES and slots_op):
                with pytest.raises(ValueError, match="num_classes"):
                    _cosine_backward(K, dtype, slots_op, "cuda")
                continue
            got = _cosine_backward(K, dtype, slots_op, "cuda")
            want = _cosine_backward(K, dtype, slots_op, "cpu")
            for g, w in zip(got, want):
                torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)


# --- bfloat16 at C = 2048 -------------------------------------------------------------------------

def test_bfloat16_wide_features(device):
    """A 2048-channel bfloat16 teacher and a 512-channel student: centroids, IDD and IFVD within
    bfloat16's tolerance of the float64 reference."""
    B, H, W, K = 2, 12, 20, 19
    y = make_labels(B, 48, 80, K, device=device)
    s = make_feats(B, 512, H, W, dtype=torch.bfloat16, device=device, seed=1)
    t = make_feats(B, 2048, H, W, dtype=torch.bfloat16, device=device, seed=2)
    c, n = idd_ops.class_centroids(t, y, K)
    c_ref, n_ref = reference.class_centroids(t.double(), y, K)
    assert c.dtype == torch.bfloat16 and torch.equal(n, n_ref)
    torch.testing.assert_close(c.double(), c_ref, rtol=2e-2, atol=2e-2)
    for fn in (idd_ops.inter_class_distance_loss, idd_ops.intra_class_variation_loss):
        x = s.detach().clone().requires_grad_()
        x64 = s.detach().double().requires_grad_()
        loss = fn(x, t, y, K)
        loss.backward()
        want = getattr(reference, fn.__name__)(x64, t.double(), y, K)
        want.backward()
        assert loss.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss.double(), want, rtol=5e-2, atol=1e-3 * float(want.detach()))
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=5e-2, atol=5e-2 * float(x64.grad.abs().max()))


# --- IFVD under deterministic mode ----------------------------------------------------------------

def test_ifvd_under_deterministic_mode(device):
    """torch.use_deterministic_algorithms(True): the IFVD forward repeats bit for bit on every
    device, and so does the backward (the slot-map path: fixed-order class sums). CUDA's labels op
    (IFVD's past MAX_SLOT_CLASSES classes) adds its backward with float atomics, so it raises
    there, as PyTorch's own nondeterministic kernels do, or warns with warn_only=True."""
    K = 6
    y = make_labels(2, 32, 48, K, device=device, blocky=False)
    s = make_feats(2, 16, 16, 24, dtype=torch.float32, device=device, seed=1).requires_grad_()
    t = make_feats(2, 32, 16, 24, dtype=torch.float32, device=device, seed=2)
    torch.use_deterministic_algorithms(True)
    try:
        losses = [idd_ops.intra_class_variation_loss(s, t, y, K) for _ in range(3)]
        assert all(torch.equal(loss, losses[0]) for loss in losses)
        grads = [torch.autograd.grad(idd_ops.intra_class_variation_loss(s, t, y, K), s)[0] for _ in range(3)]
        assert all(torch.equal(g, grads[0]) for g in grads)
        if s.is_cuda:
            cent = idd_ops.class_centroids(s.detach(), y, K)[0]
            with pytest.raises(RuntimeError, match="_pixel_centroid_cosine_backward"):
                torch.ops.idd_ops.pixel_centroid_cosine(s, cent, y, 255, 1e-8)[0].sum().backward()
            torch.use_deterministic_algorithms(True, warn_only=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.ops.idd_ops.pixel_centroid_cosine(s, cent, y, 255, 1e-8)[0].sum().backward()
            assert any("_pixel_centroid_cosine_backward" in str(w.message) for w in caught)
    finally:
        torch.use_deterministic_algorithms(False)
