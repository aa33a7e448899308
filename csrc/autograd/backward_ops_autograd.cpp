// Autograd of the ops' backward ops (idd_ops::_<op>_backward): none has a derivative, so a
// gradient taken with create_graph=True carries a node that refuses to be differentiated again.
//
// Why a kernel at all: without one, torch runs the backward op below autograd and the gradient
// it returns looks differentiable, but a second derivative through it comes back silently zero
// or partial (a gradient penalty over a distillation loss would train on a wrong value). One
// boxed kernel serves every backward op, as torch's own fallback for underived ops does; its
// message says what is unsupported and what still works.
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "autograd.h"

namespace idd_ops {
namespace {

// Torch 2.13 holds autograd nodes in intrusive pointers, earlier versions in shared ones.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<T>(std::forward<Args>(args)...);
  else
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
}

void backward_op_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  // the inputs a derivative of the outputs would reach: none when grad mode is off, as in every
  // backward without create_graph=True
  std::vector<at::Tensor> reached;
  if (at::GradMode::is_enabled())
    for (const c10::IValue& arg : torch::jit::last(*stack, op.schema().arguments().size()))
      if (arg.isTensor() && arg.toTensor().requires_grad()) reached.push_back(arg.toTensor());
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (reached.empty()) return;
  const std::string message = op.schema().name() +
                              ": a derivative of this gradient (double backward, e.g. a gradient penalty) is not "
                              "supported; the gradient itself, with create_graph=True or not, is exact. "
                              "idd_ops.reference computes the same losses in differentiable PyTorch.";
  const auto node = make_node<torch::autograd::Error>(message, torch::autograd::collect_next_edges(reached));
  for (size_t i = stack->size() - op.schema().returns().size(); i < stack->size(); ++i) {
    c10::IValue& out = (*stack)[i];
    if (out.isTensor() && out.toTensor().defined() && at::isFloatingType(out.toTensor().scalar_type()))
      torch::autograd::set_history(out.toTensor(), node);
  }
}

}  // namespace

// Every backward op of idd_ops.cpp; tests/test_double_backward.py checks that none is missing.
TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) {
  for (const char* name : {"_class_centroids_backward", "_class_sums_backward", "_class_distance_matrix_backward",
                           "_idd_loss_backward", "_idd_tail_backward", "_position_encoding_loss_backward",
                           "_softmax_kl_backward", "_affinity_loss_backward", "_pixel_centroid_cosine_backward",
                           "_pixel_centroid_cosine_slots_backward", "_class_means_backward",
                           "_pixel_kd_sum_backward", "_ifvd_loss_backward", "_affinity_loss_sum_backward"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&backward_op_autograd>());
}

}  // namespace idd_ops
