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
