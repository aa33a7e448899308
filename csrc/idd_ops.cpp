// Every op schema of idd_ops. Device kernels live in cpu/ and cuda/ under the same stem,
// autograd kernels in autograd/; fake (meta) kernels are registered from Python in idd_ops/_ops.py.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string_view>

// An importable module, so `import idd_ops._C` loads the library and runs the
// registrations below (the ops themselves are reached through torch.ops.idd_ops).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(idd_ops, m) {
  // Per-image class means of feats [B,C,H,W] under labels [B,Hy,Wy] resized (nearest) to
  // H x W: centroids [B,K,C] in the accumulation dtype, counts [B,K] int64.
  m.def("class_centroids(Tensor feats, Tensor labels, int num_classes, int ignore_index) -> (Tensor, Tensor)");
  // Gradient of class_centroids w.r.t. feats; the labels are re-read, never stored resized.
  m.def("_class_centroids_backward(Tensor grad_centroids, Tensor labels, Tensor counts, SymInt height, "
        "SymInt width, ScalarType dtype, int ignore_index) -> Tensor");
  // class_centroids with a fixed summation order (ATen calls): the CUDA op's deterministic path.
  m.def("_class_centroids_ordered(Tensor feats, Tensor labels, int num_classes, int ignore_index) -> (Tensor, Tensor)");
  // Class slot of every feature pixel: labels [B,Hy,Wy] resized (nearest) to height x width,
  // [B,H,W] int16, the class in [0, K) or -1 for ignore_index. Computed once per (labels, H, W)
  // and shared by every class pass over features of that size (and by their backward).
  m.def("_label_slots(Tensor labels, SymInt height, SymInt width, int num_classes, int ignore_index) -> Tensor");
  // Per-image, per-class feature sums of feats [B,C,H,W] (NCHW or channels_last, read in place):
  // sums [B,K,C] float64 for every feature dtype (they hold count x a common offset exactly; the
  // kernels add x - pivot in the accumulation dtype), counts [B,K] int64. Fixed summation order.
  m.def("class_sums(Tensor feats, Tensor slots, int num_classes) -> (Tensor, Tensor)");
  // class_sums of two feature maps (student and teacher) in one launch where the shapes allow.
  m.def("class_sums_pair(Tensor feats_a, Tensor slots_a, Tensor feats_b, Tensor slots_b, int num_classes) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradient of class_sums: grad_feats[b,c,p] = grad_sums[b, slot_p, c] (0 where slot_p = -1),
  // [B,C,H,W] of `dtype`, channels_last when `channels_last`.
  m.def("_class_sums_backward(Tensor grad_sums, Tensor slots, ScalarType dtype, bool channels_last) -> Tensor");
  // [B,K,K] distances between present classes' centroids (0 for absent ones and on the diagonal).
  m.def("class_distance_matrix(Tensor centroids, Tensor counts, str metric, bool normalize, float eps) -> Tensor");
  m.def("_class_distance_matrix_backward(Tensor grad, Tensor centroids, Tensor counts, str metric, "
        "bool normalize, float eps) -> Tensor");
  // Squared difference of student and teacher distances over pairs valid in both, reduced.
  m.def("idd_loss(Tensor student_dist, Tensor teacher_dist, Tensor student_counts, Tensor teacher_counts, "
        "str reduction) -> Tensor");
  m.def("_idd_loss_backward(Tensor grad, Tensor student_dist, Tensor teacher_dist, Tensor student_counts, "
        "Tensor teacher_counts, str reduction) -> Tensor");
  // The IDD tail from per-image class sums [B,K,C] and counts [B,K] of the student and the
  // teacher (channel counts may differ) to the loss, with the tensors its backward reads (layout:
  // common/idd_tail.h). The teacher is a constant; the backward gives the student sums' gradient.
  // dtype: of the K x K math and dist (float32 or float64; None: the sums' accumulation dtype);
  // the library asks for float64, which resolves classes far closer together than their spread
  // (METHOD.md 8). loss_dtype: the loss's (float32 or float64; None: dtype), so that a float32
  // loss needs no cast launch either way.
  m.def("idd_tail(Tensor student_sums, Tensor student_counts, Tensor teacher_sums, Tensor teacher_counts, "
        "str metric, bool normalize, float eps, str reduction, ScalarType? dtype=None, ScalarType? loss_dtype=None) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_idd_tail_backward(Tensor grad, Tensor student_sums, Tensor student_counts, Tensor teacher_counts, "
        "Tensor dist, Tensor stats, str metric, bool normalize, float eps, str reduction) -> Tensor");
  // MSE between pred [B,M,H,W] and M analytic position maps (kinds[m], params[m], codes of
  // common/position.h) generated inside the kernel; "none" gives the elementwise errors.
  m.def("position_encoding_loss(Tensor pred, int[] kinds, float[] params, str reduction) -> Tensor");
  m.def("_position_encoding_loss_backward(Tensor grad, Tensor pred, int[] kinds, float[] params, str reduction) "
        "-> Tensor");
  // KL(softmax(teacher / T) || softmax(student / T)) along dim 1 of [outer, length, inner]
  // tensors: KL [outer, inner] in the accumulation dtype, and the student's and teacher's
  // log-sum-exp of x / T per vector in float64 (their absolute error is the probabilities'
  // relative one), kept for the one-pass backward. Pixel KD and CWD are views.
  m.def("softmax_kl(Tensor student, Tensor teacher, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def("_softmax_kl_backward(Tensor grad, Tensor student, Tensor teacher, Tensor lse_student, Tensor lse_teacher, "
        "float temperature) -> Tensor");
  // Pixel KD reduced in the op: T^2 times softmax_kl's KL summed in float64 over the pixels whose
  // slot (int16 [outer, inner], _label_slots') is >= 0 (every pixel without slots), divided by
  // their number (at least 1) where `mean`. Returns the loss (0-dim, accumulation dtype), both
  // log-sum-exps (softmax_kl's, of every pixel) and the factor (0-dim float64: T^2 / count, or
  // T^2) that the backward multiplies the incoming gradient by at the kept pixels (0 elsewhere).
  m.def("_pixel_kd_sum(Tensor student, Tensor teacher, Tensor? slots, float temperature, bool mean) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_pixel_kd_sum_backward(Tensor grad, Tensor student, Tensor teacher, Tensor? slots, Tensor lse_student, "
        "Tensor lse_teacher, Tensor factor, float temperature) -> Tensor");
  // Per-image mean over P*P of (A_S - A_T)^2 ([B], accumulation dtype), A = F^T F of the P
  // pooled (pool x pool max, ceil mode), channel-normalised pixels of [B, C, H, W] features,
  // through C x C Gram products (never the P x P affinity; pooled copies of pool * pool images
  // at most, csrc/composite/affinity_loss.h); also returns G_ss and G_sd (S D^T, its first Ct
  // columns) for the backward.
  m.def("affinity_loss(Tensor student, Tensor teacher, int pool) -> (Tensor, Tensor, Tensor)");
  m.def("_affinity_loss_backward(Tensor grad, Tensor student, Tensor teacher, Tensor gram_ss, Tensor gram_sd, "
        "int pool) -> Tensor");
  // SKD reduced in the op: affinity_loss's per-image means added in float64 and scaled once, by
  // 1 / B where `mean` (the mean over all B * P * P entries), else by P * P (their sum). Returns
  // the loss (0-dim, accumulation dtype) and affinity_loss's two Grams for the backward.
  m.def("_affinity_loss_sum(Tensor student, Tensor teacher, int pool, bool mean) -> (Tensor, Tensor, Tensor)");
  m.def("_affinity_loss_sum_backward(Tensor grad, Tensor student, Tensor teacher, Tensor gram_ss, Tensor gram_sd, "
        "int pool, bool mean) -> Tensor");
  // IFVD's map: cosine similarity of each pixel's feature to its class centroid [B,K,C]
  // (1 where ignored), with the feature norms [B,H,W] kept for the backward.
  m.def("pixel_centroid_cosine(Tensor feats, Tensor centroids, Tensor labels, int ignore_index, float eps) "
        "-> (Tensor, Tensor)");
  m.def("_pixel_centroid_cosine_backward(Tensor grad, Tensor feats, Tensor centroids, Tensor labels, Tensor cos, "
        "Tensor feat_norms, int ignore_index, float eps) -> (Tensor, Tensor)");
  // pixel_centroid_cosine with the pixel classes read from a class-slot map [B,H,W] int16 of
  // _label_slots (values in [-1, K)) instead of labels: IFVD builds the map once per call and
  // its forward and backward (which saves the map, not the labels) read it with no resize. A
  // separate op rather than a changed schema: the labels op serves more classes than a slot map
  // holds (MAX_SLOT_CLASSES), and its callers keep their arguments.
  // counts ([B, K] int64, optional): the centroids are feats' own class means over the slot map,
  // with these pixel counts, and the backward's grad_feats also carries the path through them
  // (each pixel of class k gets grad_centroids[k] / counts[k]), so IFVD's student needs no class-sum
  // backward pass and no gradient sum after it; the second gradient output is grad_centroids as
  // without counts. Without counts the centroids are an independent input.
  m.def("_pixel_centroid_cosine_slots(Tensor feats, Tensor centroids, Tensor slots, float eps, Tensor? counts=None) "
        "-> (Tensor, Tensor)");
  m.def("_pixel_centroid_cosine_slots_backward(Tensor grad, Tensor feats, Tensor centroids, Tensor slots, "
        "Tensor cos, Tensor feat_norms, float eps, Tensor? counts=None) -> (Tensor, Tensor)");
  // Class means [B,K,C] in `dtype` from float64 class sums [B,K,C] and counts [B,K] int64: sums /
  // max(count, 1), divided in float64 and rounded once (0 for an absent class), the class-sum
  // path's centroids; the backward gives grad / max(count, 1) in float64. On CUDA one launch each
  // where the clamp, the division and the cast took three forward and two backward.
  m.def("_class_means(Tensor sums, Tensor counts, ScalarType dtype) -> Tensor");
  m.def("_class_means_backward(Tensor grad, Tensor counts) -> Tensor");
  // IFVD's two maps in one op, from both networks' float64 class sums [B,K,C] over one slot map
  // and their shared counts [B,K]: the student's and the teacher's cosine maps, the student's
  // feature norms and its centroids (the sums' means in the accumulation dtype) for the backward,
  // which is _pixel_centroid_cosine_slots_backward's with counts. The teacher and the sums are
  // constants; student and teacher share one dtype. On CUDA one launch builds both centroid tables
  // and one computes both maps, where the two slot ops and the centroid divisions took seven.
  m.def("_ifvd_maps(Tensor student, Tensor teacher, Tensor student_sums, Tensor teacher_sums, Tensor counts, "
        "Tensor slots, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // IFVD's loss in one op: (loss, cos_s, cos_t, fnorm_s, student_table, student_norms), the loss
  // the maps' squared difference summed over every pixel (mean: divided by their number B*H*W; 0
  // without pixels), 0-dim in the maps' dtype; then _ifvd_maps' three maps; then the student's
  // centroids as the backward reads them, channel-major [B, Cs, K], and their norms [B, K], both
  // in the maps' dtype. On CUDA the maps' launch also adds the squares (its last blocks), and the
  // backward is _pixel_centroid_cosine_slots_backward's launches on the forward's table (no table
  // launch of its own), its factor pass forming the gradient map from both maps, where mse_loss
  // and its backward took about five.
  m.def("_ifvd_loss(Tensor student, Tensor teacher, Tensor student_sums, Tensor teacher_sums, Tensor counts, "
        "Tensor slots, float eps, bool mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_ifvd_loss_backward(Tensor grad, Tensor student, Tensor student_table, Tensor student_norms, Tensor slots, "
        "Tensor cos_student, Tensor cos_teacher, Tensor feat_norms, Tensor counts, float eps, bool mean) -> Tensor");
}

namespace {

// Under torch.autocast the kernels' own ATen calls (their GEMMs, sums, copies) would be recast to
// half precision: a float32 accumulation run in bfloat16, or a float32 buffer the kernel then
// reads coming back as bfloat16. The ops take their inputs as given (the Python layer picks the
// loss dtype), so their autocast kernel only switches autocast off for the rest of the call.
void without_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_autocast(torch::Library& m) {
  constexpr std::string_view kNamespace = "idd_ops::";
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (std::string_view(op.name).substr(0, kNamespace.size()) == kNamespace)
      m.impl(op.name.substr(kNamespace.size()).c_str(), torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
  }
}

}  // namespace

// After TORCH_LIBRARY in this file, so every schema above is defined when these run.
TORCH_LIBRARY_IMPL(idd_ops, AutocastCPU, m) { register_autocast(m); }
TORCH_LIBRARY_IMPL(idd_ops, AutocastCUDA, m) { register_autocast(m); }
