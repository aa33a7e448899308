"""A gradient taken with create_graph=True is exact, and differentiating it again raises a clear
error (csrc/autograd/backward_ops_autograd.cpp) instead of giving a silently wrong second
derivative, as every fused op did before its backward op had an autograd kernel."""
import pytest
import torch

import idd_ops  # noqa: F401  (registers the ops)
from tests.op_calls import CALLS


def test_every_backward_op_has_an_autograd_kernel():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("idd_ops::") and n.endswith("_backward")]
    assert len(names) >= 10
    assert [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "Autograd")] == []


def _gradient(name, create_graph):
    inputs, forward = CALLS[name]
    x = inputs[0].double().requires_grad_()
    out = forward(x, *inputs[1:])
    weight = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).view(out.shape)
    (grad,) = torch.autograd.grad((out * weight).sum(), x, create_graph=create_graph)
    return x, grad


# ops linear in their input: the gradient does not depend on it, so it has no history to refuse
LINEAR = {"class_centroids"}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_gradient_of_the_gradient_raises_and_the_gradient_is_exact(name):
    x, grad = _gradient(name, create_graph=True)
    assert torch.equal(grad.detach(), _gradient(name, create_graph=False)[1])
    assert grad.requires_grad == (name not in LINEAR)
    if name in LINEAR:
        return
    with pytest.raises(RuntimeError, match=r"idd_ops::_\w+_backward: a derivative of this gradient \(double backward"):
        torch.autograd.grad((grad ** 2).sum(), x)


def test_without_create_graph_the_gradient_has_no_history():
    assert not _gradient("idd_loss", create_graph=False)[1].requires_grad
