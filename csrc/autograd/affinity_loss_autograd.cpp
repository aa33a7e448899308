// Autograd of affinity_loss: the student's gradient from the C x C Grams the forward returned;
// the teacher is a constant.
#include <torch/library.h>

#include "teacher_loss.h"

namespace idd_ops {

struct AffinityLoss {
  static constexpr const char* kName = "affinity_loss";
  static constexpr const char* kForward = "idd_ops::affinity_loss";
  static constexpr const char* kBackward = "idd_ops::_affinity_loss_backward";
  using Option = int64_t;  // the pooling size
};

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("affinity_loss", &TeacherLossFunction<AffinityLoss>::call); }

}  // namespace idd_ops
