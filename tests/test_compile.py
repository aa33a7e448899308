"""torch.compile traces through the ops (fake kernels) and matches eager mode."""
import pytest
import torch

import idd_ops
from conftest import make_feats, make_labels


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_loss_fullgraph(device, dynamic):
    torch._dynamo.reset()
    fn = torch.compile(idd_ops.inter_class_distance_loss, fullgraph=True, dynamic=dynamic)
    for H, W in ((8, 12), (10, 14)):  # a second spatial size must not fail
        s = make_feats(2, 4, H, W, dtype=torch.float32, device=device).requires_grad_()
        t = make_feats(2, 6, H, W, dtype=torch.float32, device=device, seed=3)
        y = make_labels(2, 2 * H, 2 * W, 5, device=device)
        got = fn(s, t, y, 5, normalize="mean")
        (g_got,) = torch.autograd.grad(got, s)
        want = idd_ops.inter_class_distance_loss(s, t, y, 5, normalize="mean")
        (g_want,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, g_want)


def test_compiled_module(device):
    torch._dynamo.reset()
    mod = torch.compile(idd_ops.nn.InterClassDistanceLoss(5), fullgraph=True)
    s = make_feats(2, 4, 8, 8, dtype=torch.float32, device=device).requires_grad_()
    t = make_feats(2, 6, 8, 8, dtype=torch.float32, device=device, seed=3)
    y = make_labels(2, 16, 16, 5, device=device)
    torch.testing.assert_close(mod(s, t, y), idd_ops.inter_class_distance_loss(s, t, y, 5))


def _losses(device):
    s = make_feats(2, 4, 8, 10, dtype=torch.float32, device=device).requires_grad_()
    t = make_feats(2, 6, 8, 10, dtype=torch.float32, device=device, seed=3)
    y = make_labels(2, 16, 20, 5, device=device)
    logits = make_feats(2, 5, 8, 10, dtype=torch.float32, device=device, seed=4)
    return s, {
        "idd": lambda: idd_ops.inter_class_distance_loss(s, t, y, 5, normalize="mean"),
        "ifvd": lambda: idd_ops.intra_class_variation_loss(s, t, y, 5),
        "pixel_kd": lambda: idd_ops.pixel_kd_loss(s[:, :4], logits[:, :4]),
        "cwd": lambda: idd_ops.channel_wise_distillation_loss(s, t[:, :4]),
        "skd": lambda: idd_ops.structural_kd_loss(s, t, pool=2),
        "position": lambda: idd_ops.position_encoding_loss(s[:, :2], ["horizontal", "gaussian"]),
    }


# (loss, class-sum path): IDD and IFVD on both class-pass paths
AUTOGRAD_CASES = [(name, False) for name in ("idd", "ifvd", "pixel_kd", "cwd", "skd", "position")] + \
    [("idd", True), ("ifvd", True)]


# torch 2.4's compiled autograd raises "compiled_args not implemented" on any C++ autograd
# node; 2.5 traces those that declare is_traceable, as the ops' do (docs/API.md)
@pytest.mark.skipif(torch.__version__ < (2, 5), reason="compiled autograd traces C++ autograd nodes from torch 2.5 on")
@pytest.mark.parametrize("name,class_sums", AUTOGRAD_CASES, ids=lambda v: {True: "class-sums", False: "labels"}.get(v, v))
def test_compiled_autograd_backward(device, name, class_sums, monkeypatch):
    """The ops' C++ autograd nodes under torch's compiled autograd (the backward traced by dynamo):
    the gradient equals eager mode's. A C++ node whose outputs were marked non-differentiable
    fails here (torch asserts on them), so side outputs leave the ops detached."""
    from torch._dynamo import compiled_autograd

    monkeypatch.setattr(idd_ops._switches, "class_sums_path", lambda device, channels_last=False: class_sums)
    monkeypatch.setattr(idd_ops._switches, "slot_map_path", lambda device: class_sums)
    s, losses = _losses(device)
    (want,) = torch.autograd.grad(losses[name](), s)
    torch._dynamo.reset()
    enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable  # _enable from torch 2.6
    with enable(torch.compile(backend="eager")):
        losses[name]().backward()
    torch.testing.assert_close(s.grad, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["idd", "pixel_kd"])  # CWD takes pixel KD's kernels' tickets
def test_reduce_overhead_cuda_graphs(name):
    """torch.compile(mode="reduce-overhead") captures the loss and its backward in CUDA graphs
    (cudagraph trees, which check that nothing they did not hand out lives in their memory pool
    after the warm-up runs): the kernels whose last block finishes a grid keep their ticket
    counters outside that pool, and every replay gives the eager values."""
    torch._dynamo.reset()
    s, losses = _losses("cuda")
    loss = losses[name]

    def step():
        value = loss()
        (grad,) = torch.autograd.grad(value, s)
        return value.detach().clone(), grad.clone()

    want = step()
    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(4):  # warm-up, capture, replays
        got = compiled()
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
