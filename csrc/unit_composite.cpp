// One translation unit for the ops built from ATen calls, csrc/composite/*.cpp.
// Why: each of those files includes torch's headers, which take the compiler 20-50 s to read;
// read once for the group, the build takes about a third of the CPU time (setup.py compiles
// the unit_*.cpp files, not the group's files). The group's files share one anonymous
// namespace here, so their file-local names must differ; tests/test_build_units.py checks
// that every file of the group is listed.
#include "composite/affinity_loss.cpp"
#include "composite/affinity_loss_batched.cpp"
#include "composite/class_centroids_ordered.cpp"
#include "composite/class_distance_matrix.cpp"
#include "composite/idd_loss.cpp"
#include "composite/idd_tail.cpp"
#include "composite/position_map_code.cpp"
