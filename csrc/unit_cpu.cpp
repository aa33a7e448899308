// One translation unit for the CPU kernels, csrc/cpu/*.cpp, so that torch's headers are read
// once for the group (csrc/cpu/kernels/ stays apart: compiled per CPU capability). Why, and the
// rules for the group's files: docs/ARCHITECTURE.md, "Build".
#include "cpu/class_centroids_cpu.cpp"
#include "cpu/class_sums_cpu.cpp"
#include "cpu/dispatch.cpp"
#include "cpu/pixel_centroid_cosine_cpu.cpp"
#include "cpu/position_encoding_loss_cpu.cpp"
#include "cpu/softmax_kl_cpu.cpp"
