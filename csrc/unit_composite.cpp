// One translation unit for the ops built from ATen calls, csrc/composite/*.cpp, so that torch's
// headers are read once for the group. Why, and the rules for the group's files:
// docs/ARCHITECTURE.md, "Build".
#include "composite/affinity_loss.cpp"
#include "composite/affinity_loss_batched.cpp"
#include "composite/affinity_loss_sum.cpp"
#include "composite/class_centroids_ordered.cpp"
#include "composite/class_means.cpp"
#include "composite/class_distance_matrix.cpp"
#include "composite/idd_loss.cpp"
#include "composite/idd_tail.cpp"
#include "composite/ifvd_maps.cpp"
#include "composite/pixel_kd_sum.cpp"
#include "composite/position_map_code.cpp"
