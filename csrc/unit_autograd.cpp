// One translation unit for the ops' autograd kernels, csrc/autograd/*.cpp.
// Why: each of those files includes torch's headers, which take the compiler 20-50 s to read;
// read once for the group, the build takes about a third of the CPU time (setup.py compiles
// the unit_*.cpp files, not the group's files). The group's files share one anonymous
// namespace here, so their file-local names must differ; tests/test_build_units.py checks
// that every file of the group is listed.
#include "autograd/affinity_loss_autograd.cpp"
#include "autograd/class_centroids_autograd.cpp"
#include "autograd/class_distance_matrix_autograd.cpp"
#include "autograd/class_sums_autograd.cpp"
#include "autograd/idd_loss_autograd.cpp"
#include "autograd/idd_tail_autograd.cpp"
#include "autograd/pixel_centroid_cosine_autograd.cpp"
#include "autograd/position_encoding_loss_autograd.cpp"
#include "autograd/softmax_kl_autograd.cpp"
