"""idd_ops::idd_tail, IDD's K x K tail from class sums and counts, against idd_ops.reference.

Sums are built from the reference's centroids times counts. The CPU runs the composite (the
math reference of the fused CUDA kernel); the cuda cases compare the CUDA op (fused under
IDD_OPS_CUDA_NEXT=1, the composite otherwise) with the CPU, and capture it in a CUDA graph and
under torch.compile(fullgraph=True).
"""
import pytest
import torch

import idd_ops  # noqa: F401  (loads the ops)
from idd_ops import reference
from idd_ops._idd_tail import _idd_from_sums
from conftest import make_feats, make_labels

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
    assert torch.autograd.gradcheck(fn, (ss.requires_grad_(),))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [None, "mean"])
def test_no_valid_pair_gives_zero_and_zero_gradient(device, reduction, normalize):
    ss, ns, st, nt = _random_case(2, 6, 3, 4, device=device, absent=0.0)
    nt = torch.zeros_like(nt)
    nt[:, 2] = 5  # one teacher class per image: no pair
    for K1 in (False, True):  # and K = 1
        args = (ss[:, :1], ns[:, :1], st[:, :1], nt[:, :1]) if K1 else (ss, ns, st, nt)
        loss, grad = _loss_and_grad(_tail, *args, ("euclidean", normalize, reduction))
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
