"""idd_ops._autograd.register_autograd against torch.library.register_autograd, on throwaway ops
registered each way: the same values, gradients, setup_context inputs (with the defaults the
dispatcher drops) and needs_input_grad; no graph without grad; opcheck passes (torch.compile's
tracing included); ops it does not handle go to torch's."""
import torch

from idd_ops import _autograd

_LIBS = []


SCALE = "(Tensor x, float factor=2.0, int power=1) -> Tensor"


def _define(name, schema):
    """A test op name(x, factor=2.0, power=1) = x * factor ** power, declared by `schema`."""
    lib = torch.library.Library("idd_ops_autograd_test", "FRAGMENT")
    _LIBS.append(lib)  # a Library's registrations end with it
    lib.define(name + schema)
    lib.impl(name, lambda x, factor=2.0, power=1: x * factor ** power, "CompositeExplicitAutograd")
    lib._register_fake(name, lambda x, factor=2.0, power=1: torch.empty_like(x))
    return f"idd_ops_autograd_test::{name}", getattr(torch.ops.idd_ops_autograd_test, name)


def _register(monkeypatch, name, own, schema=SCALE):
    """Registers a test op with the project's registration (own) or torch's; returns the op and
    what its setup_context and backward saw."""
    monkeypatch.setattr(_autograd, "_HOOKS", own)
    qualname, op = _define(name, schema)
    seen = {"inputs": [], "needs": []}

    def setup(ctx, inputs, output, keyword_only_inputs=None):  # torch's passes those of keyword-only arguments
        inputs = inputs + tuple((keyword_only_inputs or {}).values())
        seen["inputs"].append(inputs[1:])
        ctx.factor = inputs[1] ** inputs[2]

    def backward(ctx, grad):
        seen["needs"].append(ctx.needs_input_grad)
        return grad * ctx.factor, None, None

    _autograd.register_autograd(qualname, backward, setup)
    return op, seen


def _run(op, x):
    out = []
    for args in [(), (3.0,), (3.0, 2)]:
        y = op(x, *args)
        out.append((y, *torch.autograd.grad((y * torch.arange(5.0, dtype=x.dtype)).sum(), x)))
    return out


def test_register_autograd_matches_torchs(monkeypatch):
    own, seen_own = _register(monkeypatch, "scale_own", True)
    torchs, seen_torch = _register(monkeypatch, "scale_torch", False)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for (y, g), (y_t, g_t), factor in zip(_run(own, x), _run(torchs, x), [2.0, 3.0, 9.0]):
        torch.testing.assert_close(y, x * factor)
        torch.testing.assert_close(g, torch.arange(5.0, dtype=x.dtype) * factor)
        torch.testing.assert_close((y, g), (y_t, g_t), rtol=0, atol=0)
    assert seen_own == seen_torch
    assert seen_own["inputs"] == [(2.0, 1), (3.0, 1), (3.0, 2)]  # defaults filled in for setup_context
    assert seen_own["needs"] == [(True,), (True, False), (True, False, False)]  # one per argument passed
    assert type(own(x).grad_fn).__name__ == "idd_ops_autograd_test_scale_ownBackward"  # the own path ran
    assert type(torchs(x).grad_fn).__name__.startswith("GeneratedBackwardFor")
    with torch.no_grad():
        assert own(x).grad_fn is None
    assert own(x.detach()).grad_fn is None and len(seen_own["inputs"]) == 4  # nothing needs grad: no node
    assert torch.autograd.gradcheck(lambda t: own(t, 1.5, 3), (x,))
    torch.library.opcheck(own.default, (x, 1.5, 3))


def test_keyword_only_arguments_go_to_torchs_registration(monkeypatch):
    op, _ = _register(monkeypatch, "scale_kw", True, "(Tensor x, float factor=2.0, *, int power=1) -> Tensor")
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = op(x, 3.0, power=2)
    assert type(y.grad_fn).__name__.startswith("GeneratedBackwardFor")
    torch.testing.assert_close(y, x * 9.0)
