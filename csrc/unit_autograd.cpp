// One translation unit for the ops' autograd kernels, csrc/autograd/*.cpp, so that torch's
// headers are read once for the group. Why, and the rules for the group's files:
// docs/ARCHITECTURE.md, "Build".
#include "autograd/affinity_loss_autograd.cpp"
#include "autograd/backward_ops_autograd.cpp"
#include "autograd/class_centroids_autograd.cpp"
#include "autograd/class_distance_matrix_autograd.cpp"
#include "autograd/class_sums_autograd.cpp"
#include "autograd/idd_loss_autograd.cpp"
#include "autograd/idd_tail_autograd.cpp"
#include "autograd/pixel_centroid_cosine_autograd.cpp"
#include "autograd/pixel_kd_sum_autograd.cpp"
#include "autograd/position_encoding_loss_autograd.cpp"
#include "autograd/softmax_kl_autograd.cpp"
