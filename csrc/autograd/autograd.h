#pragma once
// Shared pieces of the autograd kernels (csrc/autograd/<op>_autograd.cpp).
//
// Why autograd in C++ (torchvision's csrc/ops/autograd pattern) rather than from Python: a
// Python autograd kernel costs every call a Python round trip at the Autograd key and a Python
// backward node: 75 us of host time per fused IDD forward+backward (measured on the CPU,
// docs/ARCHITECTURE.md "Host time"), against a target of 100 us for the whole call. Each
// forward runs its op below autograd; each backward calls the op's backward op through the
// dispatcher, so torch.compile traces both (the fake kernels stay in idd_ops/_ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include "../common/checks.h"  // channels_last_layout

namespace idd_ops {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops' autograd functions derive from this: compiled autograd (the backward traced by
// dynamo) may trace them, since each backward reads only its context's saved tensors and data
// and calls registered ops that have fake kernels. Torch 2.5 and 2.6 refuse to compile a backward
// through a C++ function that does not say so (2.13 runs one opaquely; 2.4 compiles none).
template <typename T>
struct TraceableFunction : public torch::autograd::Function<T> {
  static constexpr bool is_traceable = true;
};

// The typed handle of a registered op; call sites keep it in a function-local static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Gradients of outputs that nothing used stay undefined: without this, autograd fills a zero
// tensor for each (a launch apiece on a GPU).
inline void no_zero_fills(AutogradContext* ctx) {
  ctx->set_materialize_grads(false);
}

// Whether the backward has a gradient for output `output` and input `input` wants one.
inline bool wanted(AutogradContext* ctx, const variable_list& grads, size_t input, size_t output = 0) {
  return ctx->needs_input_grad(input) && grads[output].defined();
}

// A teacher input gets no gradient: checked when the op is called with grad mode on (not when a
// backward reaches it; under no_grad there is no gradient to miss). The op's wrapper calls it
// before apply: grad mode is off inside forward.
inline void check_constant_teacher(const at::Tensor& teacher, const char* op) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && teacher.requires_grad()), "idd_ops::", op, ": the teacher input "
              "requires grad, but it is a constant that gets no gradient; pass teacher.detach()");
}

// The outputs that carry no gradient (saved statistics, log-sum-exps, norms) leave the op
// detached instead of marked non-differentiable, which torch's compiled autograd rejects for a
// C++ node. Integer outputs (counts) need neither: autograd never gives them a gradient.
inline at::Tensor no_grad_output(const at::Tensor& output) {
  return output.detach();
}

}  // namespace idd_ops
