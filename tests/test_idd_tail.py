"""idd_ops::idd_tail, IDD's K x K tail from class sums and counts, against idd_ops.reference.

Sums are built from the reference's centroids times counts. The CPU runs the composite (the
math reference of the fused CUDA kernel); the cuda cases compare the CUDA op (fused, the
composite for inputs the fused kernels do not take) with the CPU, and capture it in a CUDA graph and
under torch.compile(fullgraph=True).
"""
import pytest
import torch

import idd_ops  # noqa: F401  (loads the ops)
from idd_ops import reference
from idd_ops._idd_tail import _idd_from_sums
from conftest import gradcheck, make_feats, make_labels

ops = torch.ops.idd_ops
OPTIONS = [(m, nz, r) for m in ("euclidean", "sqeuclidean", "cosine") for nz in (None, "mean")
           for r in ("mean", "sum", "none")]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _sums(feats, labels, K):
    """Reference class sums [B, K, C] (differentiable w.r.t. feats) and counts [B, K]."""
    c, n = reference._centroids(feats, labels, K, 255)
    return c * n[..., None], n


def _reference_from_sums(sums_s, counts_s, sums_t, counts_t, metric, normalize, reduction, eps=1e-8):
    """The reference chain from sums: centroids, reference distance matrices, pair loss."""
    def centroids(sums, counts):
        return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], torch.zeros_like(sums))

    ds = reference.class_distance_matrix(centroids(sums_s, counts_s), counts_s, metric, normalize, eps)
    dt = reference.class_distance_matrix(centroids(sums_t.to(sums_s.dtype), counts_t), counts_t, metric, normalize, eps)
    K = counts_s.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=ds.device).triu(1)
    both = (counts_s > 0) & (counts_t > 0)
    valid = both[:, :, None] & both[:, None, :] & upper
    err = torch.where(valid, (ds - dt).pow(2), torch.zeros_like(ds))
    per_image, n = err.sum((1, 2)), valid.sum((1, 2))
    if reduction == "sum":
        return per_image.sum()
    if reduction == "none":
        return per_image / n.clamp_min(1)
    return per_image.sum() / n.sum().clamp_min(1)


def _random_case(B, K, Cs, Ct, dtype=torch.float64, device="cpu", absent=0.25, seed=0):
    """Random sums and counts with a share of absent classes (count 0, sum 0) per network."""
    g = torch.Generator().manual_seed(seed)
    counts = [torch.randint(1, 50, (B, K), generator=g) * (torch.rand(B, K, generator=g) >= absent) for _ in range(2)]
    sums = [torch.randn(B, K, C, generator=g, dtype=torch.float64) * n[..., None] + 0.5 * n[..., None]
            for C, n in zip((Cs, Ct), counts)]
    return (sums[0].to(device=device, dtype=dtype), counts[0].to(device), sums[1].to(device=device, dtype=dtype),
            counts[1].to(device))


def _loss_and_grad(fn, ss, ns, st, nt, opts):
    ss = ss.detach().clone().requires_grad_()
    loss = fn(ss, ns, st, nt, *opts)
    (grad,) = torch.autograd.grad(loss.double().sum(), ss)
    return loss, grad


def _tail(ss, ns, st, nt, metric, normalize, reduction):
    return _idd_from_sums(ss, ns, st, nt, metric, normalize, 1e-8, reduction)


@pytest.mark.parametrize("opts", OPTIONS)
def test_matches_reference_end_to_end(device, opts):
    metric, normalize, reduction = opts
    s = make_feats(3, 5, 8, 8, device=device, seed=1).requires_grad_()
    t = make_feats(3, 7, 8, 8, device=device, seed=2)
    y = make_labels(3, 16, 16, 6, device=device)
    ss, ns = _sums(s, y, 6)
    st, nt = _sums(t, y, 6)
    loss = _idd_from_sums(ss, ns, st, nt, metric, normalize, 1e-8, reduction)
    (g,) = torch.autograd.grad(loss.sum(), s)
    want = reference.inter_class_distance_loss(s, t, y, 6, metric=metric, normalize=normalize, reduction=reduction)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    assert loss.shape == ((3,) if reduction == "none" else ()) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (3, 7, 5, 9), (2, 40, 6, 3)])
def test_absent_classes_match_reference(device, opts, shape):
    ss, ns, st, nt = _random_case(*shape, device=device, seed=sum(shape))
    la, ga = _loss_and_grad(_tail, ss, ns, st, nt, opts)
    lb, gb = _loss_and_grad(_reference_from_sums, ss, ns, st, nt, opts)
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
    assert (ga[ns == 0] == 0).all()  # absent classes get no gradient


@pytest.mark.parametrize("opts", OPTIONS)
def test_gradcheck(device, opts):
    ss, ns, st, nt = _random_case(2, 5, 3, 4, device=device, absent=0.2, seed=3)
    fn = lambda x: _tail(x, ns, st, nt, *opts)  # noqa: E731
    assert gradcheck(fn, (ss.requires_grad_(),))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [None, "mean"])
def test_no_valid_pair_gives_zero_and_zero_gradient(device, reduction, normalize):
    ss, ns, st, nt = _random_case(2, 6, 3, 4, device=device, absent=0.0)
    nt = torch.zeros_like(nt)
    nt[:, 2] = 5  # one teacher class per image: no pair
    for K in (6, 1, 0):  # and no classes at all (the composite's anchor argmax raised there)
        args = (ss[:, :K], ns[:, :K], st[:, :K], nt[:, :K])
        for metric in ("euclidean", "sqeuclidean", "cosine"):
            loss, grad = _loss_and_grad(_tail, *args, (metric, normalize, reduction))
            assert loss.shape == ((2,) if reduction == "none" else ()) and grad.shape == (2, K, 3)
            assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_identical_classes_have_zero_gradient(device):
    """Two classes with the same centroid: euclidean distance 0, gradient 0 (not NaN)."""
    ss, ns, st, nt = _random_case(1, 4, 3, 3, device=device, absent=0.0)
    ss[0, 1] = ss[0, 0]
    ns[0, 1] = ns[0, 0]
    loss, grad = _loss_and_grad(_tail, ss, ns, st, nt, ("euclidean", "mean", "mean"))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    lb, gb = _loss_and_grad(_reference_from_sums, ss, ns, st, nt, ("euclidean", "mean", "mean"))
    torch.testing.assert_close(loss, lb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("metric,scale", [("euclidean", 1e-9), ("sqeuclidean", 2e-5)])
def test_student_normaliser_floored_at_eps(device, metric, scale, reduction):
    """Student centroids so close that the mean distance is below eps: the normaliser is eps, a
    constant, so the gradient has no term through it (the composite's kappa is 0 where the
    normaliser is clamped; a kappa left at q / (m n) adds a term scaled by 1 / eps)."""
    ss, ns, st, nt = _random_case(2, 6, 3, 4, device=device, absent=0.0, seed=7)
    ss = ss * scale
    c = ss / ns[..., None]
    mean = reference.class_distance_matrix(c, ns, metric).sum((1, 2)) / (6 * 5)
    assert (mean < 1e-8).all() and (mean > 1e-10).all()  # floored, yet well above rounding
    opts = (metric, "mean", reduction)
    la, ga = _loss_and_grad(_tail, ss, ns, st, nt, opts)
    lb, gb = _loss_and_grad(_reference_from_sums, ss, ns, st, nt, opts)
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-9 * gb.abs().max().item())


@pytest.mark.parametrize("K", [65, 300, 2048])
def test_many_classes(K):
    opts = ("euclidean", "mean", "mean")
    ss, ns, st, nt = _random_case(1, K, 3, 2, absent=0.1, seed=K)
    la, ga = _loss_and_grad(_tail, ss, ns, st, nt, opts)
    lb, gb = _loss_and_grad(_reference_from_sums, ss, ns, st, nt, opts)
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_sums_accumulate_in_float32(device, dtype):
    ss, ns, st, nt = _random_case(2, 6, 5, 4, dtype=dtype, device=device, seed=4)
    la, ga = _loss_and_grad(_tail, ss, ns, st, nt, ("cosine", "mean", "none"))
    assert la.dtype == torch.float32 and ga.dtype == dtype
    lb, gb = _loss_and_grad(_reference_from_sums, ss.double(), ns, st.double(), nt, ("cosine", "mean", "none"))
    torch.testing.assert_close(la.double(), lb, rtol=1e-4, atol=1e-6)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ga.double(), gb.to(dtype).double(), rtol=tol, atol=tol * gb.abs().max().item())


def test_teacher_is_a_constant(device):
    ss, ns, st, nt = _random_case(2, 4, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="teacher input requires grad"):
        _tail(ss.requires_grad_(), ns, st.requires_grad_(), nt, "euclidean", None, "mean")


def test_bad_input_names_the_argument(device):
    ss, ns, st, nt = _random_case(2, 4, 3, 3, device=device)
    with pytest.raises(ValueError, match="teacher_sums"):
        ops.idd_tail(ss, ns, st[:, :3], nt, "euclidean", False, 1e-8, "mean")
    with pytest.raises(ValueError, match="student_counts"):
        ops.idd_tail(ss, ns[:, :3], st, nt, "euclidean", False, 1e-8, "mean")
    with pytest.raises(TypeError, match="teacher_counts"):
        ops.idd_tail(ss, ns, st, nt.int(), "euclidean", False, 1e-8, "mean")
    with pytest.raises(ValueError, match="metric"):
        ops.idd_tail(ss, ns, st, nt, "manhattan", False, 1e-8, "mean")
    with pytest.raises(ValueError, match="reduction"):
        ops.idd_tail(ss, ns, st, nt, "euclidean", False, 1e-8, "max")
    with pytest.raises(ValueError, match="eps"):
        ops.idd_tail(ss, ns, st, nt, "euclidean", False, 0.0, "mean")


def test_opcheck(device):
    ss, ns, st, nt = _random_case(2, 5, 3, 4, dtype=torch.float32, device=device)
    for opts in (("euclidean", True, "mean"), ("cosine", False, "none")):
        torch.library.opcheck(ops.idd_tail.default, (ss.requires_grad_(), ns, st, nt, opts[0], opts[1], 1e-8, opts[2]))


# ---- dtype: float64 sums, K x K math in float32 (what the library's calls pass) ----------


def _offset_case(B, K, C, offset=1e4, spread=1.0, seed=0, device="cpu"):
    """float64 sums count x (offset + class differences of about `spread`), the teacher's with
    another channel count and offset: the float64 sums hold the offset exactly."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, off in ((C, offset), (C + 3, 2 * offset)):
        n = torch.randint(1, 500, (B, K), generator=g) * (torch.rand(B, K, generator=g) >= 0.2)
        centroid = off + spread * torch.randn(B, K, c, generator=g, dtype=torch.float64)
        out += [(centroid * n[..., None]).to(device), n.to(device)]
    return tuple(out)


def _tail_outputs(ss, ns, st, nt, opts, dtype):
    """loss, dist, stats and the student sums' gradient of idd_tail in compute dtype `dtype`."""
    metric, normalize, reduction = opts
    ss = ss.detach().clone().requires_grad_()
    loss, dist, stats = ops.idd_tail(ss, ns, st, nt, metric, normalize == "mean", 1e-8, reduction, dtype)
    (grad,) = torch.autograd.grad(loss.sum(), ss)
    return loss, dist, stats, grad


@pytest.mark.parametrize("opts", OPTIONS)
def test_dtype_float32_of_float64_sums(device, opts):
    """dtype=float32 with float64 sums: loss and dist in float32, gradient in the sums' float64,
    all close to dtype=float64."""
    case = _random_case(2, 7, 5, 9, device=device, seed=5)
    loss, dist, stats, grad = _tail_outputs(*case, opts, torch.float32)
    want = _tail_outputs(*case, opts, torch.float64)
    assert (loss.dtype, dist.dtype, stats.dtype, grad.dtype) == (torch.float32,) * 2 + (torch.float64,) * 2
    for got, ref in zip((loss, dist, stats[:, -1, :6], grad), want[:2] + (want[2][:, -1, :6], want[3])):
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("normalize", [None, "mean"])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_dtype_float32_keeps_a_common_offset(metric, normalize):
    """Centroids formed and centred in float64 before the cast: with an offset 1e4 times the class
    spread, the float32-compute loss stays within 1e-5 of float64 (a float32 centroid holds the
    offset's 1e4 only to about 1e-3 of the spread)."""
    case = _offset_case(2, 19, 48)
    got = _tail_outputs(*case, (metric, normalize, "mean"), torch.float32)[0]
    want = _tail_outputs(*case, (metric, normalize, "mean"), torch.float64)[0]
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16, torch.complex64])
def test_bad_dtype_names_the_argument(device, dtype):
    ss, ns, st, nt = _random_case(2, 4, 3, 3, device=device)
    with pytest.raises(TypeError, match="dtype"):
        ops.idd_tail(ss, ns, st, nt, "euclidean", False, 1e-8, "mean", dtype)


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64])
def test_loss_dtype_is_the_losss_own(device, loss_dtype):
    """loss_dtype sets the loss's dtype only: its value is the float64 math's, rounded once."""
    ss, ns, st, nt = _random_case(2, 6, 3, 4, dtype=torch.float64, device=device, seed=2)
    want = ops.idd_tail(ss, ns, st, nt, "euclidean", True, 1e-8, "none", torch.float64)[0]
    got = ops.idd_tail(ss, ns, st, nt, "euclidean", True, 1e-8, "none", torch.float64, loss_dtype)[0]
    assert got.dtype == loss_dtype and torch.equal(got, want.to(loss_dtype))
    with pytest.raises(TypeError, match="loss_dtype"):
        ops.idd_tail(ss, ns, st, nt, "euclidean", True, 1e-8, "none", torch.float64, torch.float16)


def test_opcheck_with_dtype(device):
    for sums_dtype, dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64),
                              (torch.float64, torch.float64)):
        ss, ns, st, nt = _random_case(2, 5, 3, 4, dtype=sums_dtype, device=device, seed=6)
        for opts in (("euclidean", True, "mean"), ("cosine", False, "none")):
            torch.library.opcheck(ops.idd_tail.default,
                                  (ss.requires_grad_(), ns, st, nt, opts[0], opts[1], 1e-8, opts[2], dtype))
        # the library's call: float64 math, a float32 loss
        torch.library.opcheck(ops.idd_tail.default, (ss, ns, st, nt, "euclidean", True, 1e-8, "mean", torch.float64,
                                                     torch.float32))


# ---- CUDA: the op on the GPU against the CPU composite, graphs and compile -------------


def _to_cuda(*tensors):
    return tuple(t.cuda() for t in tensors)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 5, 16, 19, 40, 64, 150, 300, 1000])
@pytest.mark.parametrize("opts", OPTIONS)
def test_cuda_matches_cpu(opts, K, dtype):
    ss, ns, st, nt = _random_case(2, K, 37, 70, dtype=dtype, seed=K)
    la, ga = _loss_and_grad(_tail, *_to_cuda(ss, ns, st, nt), opts)
    lb, gb = _loss_and_grad(_tail, ss, ns, st, nt, opts)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(la.cpu(), lb, rtol=tol, atol=tol)
    torch.testing.assert_close(ga.cpu(), gb, rtol=tol, atol=tol * gb.abs().max().item())
    # the saved tensors mean the same on both paths
    m, nz, r = opts
    _, dist_a, stats_a = ops.idd_tail(*_to_cuda(ss, ns, st, nt), m, nz == "mean", 1e-8, r)
    _, dist_b, stats_b = ops.idd_tail(ss, ns, st, nt, m, nz == "mean", 1e-8, r)
    torch.testing.assert_close(dist_a.cpu(), dist_b, rtol=tol, atol=tol * dist_b.abs().max().item())
    torch.testing.assert_close(stats_a[:, K, :6].cpu(), stats_b[:, K, :6], rtol=tol, atol=tol)


@needs_gpu
def test_cuda_large_k_and_strided_sums():
    ss, ns, st, nt = _random_case(2, 2048, 48, 33, dtype=torch.float32, seed=7)
    opts = ("euclidean", "mean", "mean")
    ss_cuda = ss.cuda().transpose(1, 2).contiguous().transpose(1, 2)  # C-major: strided along C
    la, ga = _loss_and_grad(_tail, ss_cuda, *_to_cuda(ns, st, nt), opts)
    lb, gb = _loss_and_grad(_tail, ss.double(), ns, st.double(), nt, opts)
    torch.testing.assert_close(la.double().cpu(), lb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ga.double().cpu(), gb, rtol=1e-3, atol=1e-4 * gb.abs().max().item())


@needs_gpu
@pytest.mark.parametrize("K", [19, 300])
def test_cuda_deterministic_and_exact_zero(K):
    ss, ns, _, _ = _to_cuda(*_random_case(3, K, 64, 64, dtype=torch.float32, seed=K))
    runs = [_loss_and_grad(_tail, ss, ns, ss, ns, ("euclidean", "mean", "mean")) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    assert runs[0][0].item() == 0.0  # a student equal to its teacher: exactly 0
    loss = _tail(*_to_cuda(*_random_case(3, K, 64, 80, dtype=torch.float32, seed=1)), "cosine", None, "sum")
    assert torch.equal(loss, _tail(*_to_cuda(*_random_case(3, K, 64, 80, dtype=torch.float32, seed=1)), "cosine",
                                   None, "sum"))


@needs_gpu
@pytest.mark.parametrize("opts", [("euclidean", "mean", "mean"), ("cosine", None, "none"), ("sqeuclidean", "mean", "sum")])
@pytest.mark.parametrize("K", [19, 150])
def test_cuda_graph_capture_replays_eager(opts, K):
    ss, ns, st, nt = _to_cuda(*_random_case(4, K, 64, 128, dtype=torch.float32, seed=K))
    static_ss = ss.clone().requires_grad_()

    def step():
        loss = _tail(static_ss, ns, st, nt, *opts)
        (grad,) = torch.autograd.grad(loss.sum(), static_ss)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (11, 12):
        fresh = _to_cuda(*_random_case(4, K, 64, 128, dtype=torch.float32, seed=K))[0] * (1 + seed / 10)
        with torch.no_grad():
            static_ss.copy_(fresh)
        graph.replay()
        want = _loss_and_grad(_tail, fresh, ns, st, nt, opts)
        torch.cuda.synchronize()
        for got, ref in zip(out, want):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@needs_gpu
@pytest.mark.parametrize("K", [19, 150])
def test_cuda_compile_fullgraph(K):
    torch._dynamo.reset()
    ss, ns, st, nt = _to_cuda(*_random_case(2, K, 32, 48, dtype=torch.float32, seed=K))

    def loss_of(x):
        return _idd_from_sums(x, ns, st, nt, "euclidean", "mean", 1e-8, "mean")

    compiled = torch.compile(loss_of, fullgraph=True)
    results = []
    for fn in (compiled, loss_of):
        x = ss.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---- CUDA: float64 sums computing in float32 (the fused kernels' sum_t = double, acc_t = float)


@needs_gpu
@pytest.mark.parametrize("K", [1, 19, 65, 300, 2048])
@pytest.mark.parametrize("opts", [("euclidean", "mean", "mean"), ("sqeuclidean", None, "none"),
                                  ("cosine", "mean", "sum"), ("euclidean", None, "sum")])
def test_cuda_float64_sums_float32_math_match_cpu(opts, K):
    """Value, dist, stats (row K) and gradient of float64 sums with dtype=float32 against the CPU
    composite on copies, at each tile size of the forward (T = 16, 32, 64) and past 1024 classes;
    C = 37 and 70: neither a multiple of a channel chunk nor of the backward's 64 channels."""
    case = _random_case(2, K, 37, 70, absent=0.25, seed=K)
    got = _tail_outputs(*_to_cuda(*case), opts, torch.float32)
    want = _tail_outputs(*case, opts, torch.float32)
    loss, dist, stats, grad = (t.cpu() for t in got)
    assert (loss.dtype, dist.dtype, grad.dtype) == (torch.float32, torch.float32, torch.float64)
    torch.testing.assert_close(loss, want[0], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(dist, want[1], rtol=2e-4, atol=2e-4 * want[1].abs().max().item())
    torch.testing.assert_close(stats[:, K, :6], want[2][:, K, :6], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(grad, want[3], rtol=2e-4, atol=2e-4 * want[3].abs().max().item())
    assert (grad[case[1] == 0] == 0).all()  # absent classes get no gradient
    assert torch.isfinite(stats).all()  # every element written (rows no tile owns are 0)


@needs_gpu
@pytest.mark.parametrize("normalize", [None, "mean"])
@pytest.mark.parametrize("K", [19, 300])
def test_cuda_float32_math_keeps_a_common_offset(K, normalize):
    """float64 sums of count x (1e4 + class differences of 1): the float32-compute loss on CUDA
    within 1e-5 relative of the float64 one (the centroids are centred in float64 first)."""
    case = _offset_case(2, K, 64, seed=K)
    opts = ("euclidean", normalize, "mean")
    got = _tail_outputs(*_to_cuda(*case), opts, torch.float32)[0].item()
    want = _tail_outputs(*case, opts, torch.float64)[0].item()
    assert abs(got - want) <= 1e-5 * abs(want)
    # and the gradient: centred in float64, its float32 rounding is relative to the spread
    g32 = _tail_outputs(*_to_cuda(*case), opts, torch.float32)[3].cpu()
    g64 = _tail_outputs(*case, opts, torch.float64)[3]
    torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())


@needs_gpu
def test_cuda_fused_path_is_taken_for_float64_sums():
    """float64 sums with dtype=float32 run the fused kernels (their stats carry the tile partials
    in row 0; the composite leaves rows 0..K-1 zero); float32 sums computing in float64 run the
    composite."""
    case = _to_cuda(*_random_case(2, 19, 37, 70, absent=0.0, seed=8))
    _, _, stats, _ = _tail_outputs(*case, ("euclidean", "mean", "mean"), torch.float32)
    assert bool((stats[:, 0] != 0).any())
    low = (case[0].float(), case[1], case[2].float(), case[3])
    _, _, stats, grad = _tail_outputs(*low, ("euclidean", "mean", "mean"), torch.float64)
    assert not (stats[:, :19] != 0).any() and grad.dtype == torch.float32
