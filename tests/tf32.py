"""TF32 GEMMs on the CPU, for the precision tests: a CPU ignores the TF32 flags, so a float32 GEMM
that a GPU would round to TF32 is exact here and a test of "the op keeps full precision under
TF32" could not fail. `emulated_tf32()` rounds the operands of every float32 matrix product to
TF32 (10 mantissa bits, to nearest), as a GPU's tensor cores take them, wherever the product is
issued: in Python, in the reference, or inside the library's C++ ops (their ATen calls pass
through the dispatcher, which this mode sees once it is re-entered under each custom op)."""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from idd_ops import reference

aten = torch.ops.aten
# the products (functional, in-place and out= forms: the C++ ops use all three) and the positions
# of their two matrix operands (a bias is added in float32)
_GEMMS = {**{op: (0, 1) for op in (aten.mm.default, aten.mm.out, aten.bmm.default, aten.bmm.out)},
          **{op: (1, 2) for op in (aten.addmm.default, aten.addmm.out, aten.addmm_.default,
                                   aten.baddbmm.default, aten.baddbmm.out, aten.baddbmm_.default,
                                   aten.addbmm.default, aten.addbmm.out, aten.addbmm_.default)}}
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def tf32_flags_on():
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def round_to_tf32(x):
    """float32 x rounded to TF32's 10 mantissa bits (ties away from zero); other dtypes as they are."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(x.shape)


class _RoundGemmOperands(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = _GEMMS.get(func)
        if operands is not None and tf32_flags_on():
            args = tuple(round_to_tf32(a) if i in operands else a for i, a in enumerate(args))
        if func.namespace == "idd_ops":
            # the op's own kernel, with this mode active inside it (the dispatcher pops a mode
            # while its handler runs, which would hide the op's GEMMs)
            with self:
                return func.redispatch(_CPU, *args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_tf32():
    """Within: CPU float32 GEMMs round their operands to TF32 while the TF32 flags are on, and the
    reference takes its TF32 path (`_tf32_may_round`) on the CPU as it does on CUDA."""
    saved = reference._tf32_may_round
    reference._tf32_may_round = lambda x: x.dtype == torch.float32 and tf32_flags_on()
    try:
        with _RoundGemmOperands():
            yield
    finally:
        reference._tf32_may_round = saved
