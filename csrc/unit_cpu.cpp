// One translation unit for the CPU kernels, csrc/cpu/*.cpp (the per-capability loops of csrc/cpu/kernels/ stay
// units of their own: each is compiled for two instruction sets).
// Why: each of those files includes torch's headers, which take the compiler 20-50 s to read;
// read once for the group, the build takes about a third of the CPU time (setup.py compiles
// the unit_*.cpp files, not the group's files). The group's files share one anonymous
// namespace here, so their file-local names must differ; tests/test_build_units.py checks
// that every file of the group is listed.
#include "cpu/class_centroids_cpu.cpp"
#include "cpu/class_sums_cpu.cpp"
#include "cpu/dispatch.cpp"
#include "cpu/pixel_centroid_cosine_cpu.cpp"
#include "cpu/position_encoding_loss_cpu.cpp"
#include "cpu/softmax_kl_cpu.cpp"
