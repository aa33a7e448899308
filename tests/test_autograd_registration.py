"""idd_ops._autograd.register_autograd against torch.library.register_autograd, on throwaway ops:
the same values and gradients, setup_context sees the defaults the dispatcher drops, no graph
without grad, and opcheck passes (torch.compile's tracing included)."""
import pytest
import torch

from idd_ops import _autograd

_LIBS = []


def _define(name):
    """A test op scale(x, factor=2.0, power=1) = x * factor ** power, and its qualified name."""
    lib = torch.library.Library("idd_ops_autograd_test", "FRAGMENT")
    _LIBS.append(lib)  # a Library's registrations end with it
    lib.define(f"{name}(Tensor x, float factor=2.0, int power=1) -> Tensor")
    lib.impl(name, lambda x, factor=2.0, power=1: x * factor ** power, "CompositeExplicitAutograd")
    lib._register_fake(name, lambda x, factor=2.0, power=1: torch.empty_like(x))
    return f"idd_ops_autograd_test::{name}", getattr(torch.ops.idd_ops_autograd_test, name)


@pytest.mark.parametrize("hooks", [True, False], ids=["own", "torch_fallback"])
def test_register_autograd(monkeypatch, hooks):
    monkeypatch.setattr(_autograd, "_HOOKS", hooks)
    qualname, op = _define(f"scale_{'own' if hooks else 'torch'}")
    seen, needs = [], []

    def setup(ctx, inputs, output):
        seen.append(inputs[1:])
        ctx.factor = inputs[1] ** inputs[2]

    def backward(ctx, grad):
        needs.append(ctx.needs_input_grad)  # one per argument passed (the keyset hidden)
        return grad * ctx.factor, None, None

    _autograd.register_autograd(qualname, backward, setup)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for args, factor in [((), 2.0), ((3.0,), 3.0), ((3.0, 2), 9.0)]:
        y = op(x, *args)
        (grad,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(y, x * factor)
        torch.testing.assert_close(grad, torch.full_like(x, factor))
    assert seen == [(2.0, 1), (3.0, 1), (3.0, 2)]  # defaults filled in for setup_context
    assert needs == [(True,), (True, False), (True, False, False)]
    with torch.no_grad():
        assert op(x).grad_fn is None
    assert op(x.detach()).grad_fn is None and len(seen) == 3  # no input needs grad: no node
    assert torch.autograd.gradcheck(lambda t: op(t, 1.5, 3), (x,))
    torch.library.opcheck(op.default, (x, 1.5, 3))
