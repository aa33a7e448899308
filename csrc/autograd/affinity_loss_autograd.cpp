// Autograd of affinity_loss and of _affinity_loss_sum (SKD reduced in the op): the student's
// gradient from the C x C Grams the forward returned; the teacher is a constant.
#include <torch/library.h>

#include "teacher_loss.h"

namespace idd_ops {

struct AffinityLoss {
  static constexpr const char* kName = "affinity_loss";
  static constexpr const char* kForward = "idd_ops::affinity_loss";
  static constexpr const char* kBackward = "idd_ops::_affinity_loss_backward";
};

struct AffinityLossSum {
  static constexpr const char* kName = "_affinity_loss_sum";
  static constexpr const char* kForward = "idd_ops::_affinity_loss_sum";
  static constexpr const char* kBackward = "idd_ops::_affinity_loss_sum_backward";
};

// the options: the pooling size, and for the sum whether it is the mean
TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) {
  m.impl("affinity_loss", &TeacherLossFunction<AffinityLoss, int64_t>::call);
  m.impl("_affinity_loss_sum", &TeacherLossFunction<AffinityLossSum, int64_t, bool>::call);
}

}  // namespace idd_ops
