"""Autograd registration for the library's ops: the contract of torch.library.register_autograd
(an Autograd-key kernel that runs the op below autograd inside an autograd.Function and calls
``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``), with the op's default
arguments read once instead of on every call.

Why: the dispatcher drops trailing arguments equal to their defaults, and register_autograd puts
them back for setup_context on every call by rebuilding the schema's argument list once per
argument. That costs host time growing with the square of the argument count: 55 us per
``idd_tail`` call (9 arguments), 19 us per ``class_sums_pair`` (5), 8 us for 3, measured on the
CPU: about 75 us of every fused IDD forward, host time that a small GPU workload waits on.
Where this torch lacks the dispatcher hooks used here, or an op has keyword-only, tensor-list
or mutated arguments, torch.library.register_autograd is used as it is.
"""
from typing import Callable

import torch

_HOOKS = all(hasattr(torch._C, name) for name in ("_AutoDispatchBelowAutograd", "_after_autograd_keyset"))


def register_autograd(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """Register `backward` and `setup_context` for the op `qualname` ("idd_ops::name")."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    arguments = op._schema.arguments
    if not _HOOKS or not hasattr(op, "redispatch") or not all(_plain(a) for a in arguments):
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    defaults = tuple(a.default_value for a in arguments)

    def below_autograd(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    # apply(*args, keyset): the keyset rides last and gets no gradient
    def forward(ctx, *args_and_keyset):
        args, keyset = args_and_keyset[:-1], args_and_keyset[-1]
        output = below_autograd(keyset, args)
        setup_context(ctx, args + defaults[len(args):], output)
        return output

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]  # as the op's inputs, without the keyset
        try:
            grads_in = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*grads_in, None) if isinstance(grads_in, tuple) else (grads_in, None)

    # named after the op: its node shows as <namespace>_<name>Backward in grad_fn and profiles
    Node = type(f"{namespace}_{name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_)})

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Node.apply(*args, keyset)
        return below_autograd(keyset, args)

    _library(namespace).impl(name, kernel, "Autograd", with_keyset=True)


def _plain(argument) -> bool:
    """An argument this registration handles: positional, not a list of tensors, not mutated
    (every op of this library has only such; torch's registration serves the others, or
    rejects them)."""
    type_ = str(argument.type)
    mutated = argument.alias_info is not None and argument.alias_info.is_write
    return not argument.kwarg_only and not mutated and not ("List[" in type_ and "Tensor" in type_)


_LIBRARIES = {}


def _library(namespace):
    # one fragment per namespace, kept alive: a Library's registrations end with it
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "IMPL")
    return _LIBRARIES[namespace]
