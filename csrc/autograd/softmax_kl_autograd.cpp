// Autograd of softmax_kl: one pass over student and teacher with the log-sum-exps the forward
// returned; the teacher is a constant.
#include <torch/library.h>

#include "teacher_loss.h"

namespace idd_ops {

struct SoftmaxKL {
  static constexpr const char* kName = "softmax_kl";
  static constexpr const char* kForward = "idd_ops::softmax_kl";
  static constexpr const char* kBackward = "idd_ops::_softmax_kl_backward";
};

// the option: the temperature
TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("softmax_kl", &TeacherLossFunction<SoftmaxKL, double>::call); }

}  // namespace idd_ops
