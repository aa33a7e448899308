#pragma once
// Argument front ends of every registered op, shared by all devices. Each op (and each
// backward op) calls its check_<op>_inputs before touching data, so a direct call of
// torch.ops.idd_ops.<op> with a mismatched argument stops with an error naming the argument
// instead of reaching a kernel that would read out of bounds (or, on CUDA, a host pointer).
// Only metadata is read: no check synchronises with a device.
#include <ATen/ATen.h>

#include <array>
#include <cfloat>
#include <optional>
#include <string>

#include "enums.h"
#include "label_index.h"
#include "position.h"

namespace idd_ops {

// The accumulation dtype of a feature dtype: float for half/bfloat16/float, double for double.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A [B, C, H, W] tensor whose memory is [B, H, W, C] (and not also NCHW: one channel or one
// pixel is both, and takes the NCHW path): what the class-sum kernels read in place, and the
// layout their gradient then comes in (idd_ops/_ops.py has the same test in Python).
inline bool channels_last_layout(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// ---- building blocks -------------------------------------------------------------------

inline void check_rank(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected a ", dim, "-D ", shape, " tensor, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, ": expected a floating dtype, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": on ", t.device(), " but ", ref_name, " on ", ref.device());
}

inline void check_size(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* why) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", expected, " (", why, "), got ", t.sizes());
}

// counts [B, K] int64 on ref's device: the class sizes returned by class_centroids.
inline void check_counts(const at::Tensor& counts, const char* name, int64_t B, int64_t K, const at::Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, name, ": expected int64 class counts, got ",
                   counts.scalar_type());
  check_size(counts, name, {B, K}, "[B, K] like the centroids");
  check_same_device(counts, name, ref, ref_name);
}

// Scalar gradient of a reduced loss ("mean"/"sum") or [B] per-image gradient ("none").
inline void check_loss_grad(const at::Tensor& grad, const at::Tensor& ref, const char* ref_name, Reduction reduction,
                            at::IntArrayRef none_shape) {
  check_floating(grad, "grad");
  check_same_device(grad, "grad", ref, ref_name);
  if (reduction == Reduction::None)
    check_size(grad, "grad", none_shape, "the loss's shape with reduction 'none'");
  else
    TORCH_CHECK_VALUE(grad.numel() == 1, "grad: expected one value (a reduced loss), got shape ", grad.sizes());
}

inline void check_eps(double eps) {
  // > 0: eps floors the cosine denominator and the "mean" normaliser, which must not be 0.
  TORCH_CHECK_VALUE(eps > 0 && eps < INFINITY, "eps: expected a finite value > 0, got ", eps);
}

// The incoming gradient of a loss in the accumulation dtype: `like`-shaped for reduction
// "none", one value otherwise (both devices' backward preludes read it this way).
inline at::Tensor loss_grad_acc(const at::Tensor& grad, const at::Tensor& like, Reduction reduction) {
  const auto acc = acc_dtype(like.scalar_type());
  return (reduction == Reduction::None ? grad.expand_as(like) : grad.reshape({})).to(acc).contiguous();
}

// ---- class_centroids -------------------------------------------------------------------

// labels [B, Hy, Wy] (any integer dtype) for an H x W map of B images on ref's device.
inline void check_labels(const at::Tensor& labels, int64_t B, int64_t HW, const at::Tensor& ref, const char* ref_name) {
  check_rank(labels, "labels", 3, "[B, Hy, Wy]");
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels: expected an integer dtype, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.size(0) == B, "labels: batch size ", labels.size(0), " differs from ", ref_name,
                    "' batch size ", B);
  check_same_device(labels, "labels", ref, ref_name);
  TORCH_CHECK_VALUE(HW == 0 || labels.size(1) * labels.size(2) > 0, "labels: spatial size ", labels.sizes(),
                    " is empty but the feature map's is not");
}

inline void check_class_centroids_inputs(const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes) {
  check_rank(feats, "feats", 4, "[B, C, H, W]");
  check_floating(feats, "feats");
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes: expected >= 1, got ", num_classes);
  check_labels(labels, feats.size(0), feats.size(2) * feats.size(3), feats, "feats");
}

inline void check_class_centroids_backward_inputs(const at::Tensor& grad_centroids, const at::Tensor& labels,
                                                  const at::Tensor& counts, int64_t height, int64_t width,
                                                  at::ScalarType dtype) {
  check_rank(grad_centroids, "grad_centroids", 3, "[B, K, C]");
  check_floating(grad_centroids, "grad_centroids");
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dtype: expected a floating dtype, got ", dtype);
  TORCH_CHECK_TYPE(grad_centroids.scalar_type() == acc_dtype(dtype), "grad_centroids: expected dtype ",
                   acc_dtype(dtype), " (the centroids' dtype for features of dtype ", dtype, "), got ",
                   grad_centroids.scalar_type());
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, "height, width: expected sizes >= 0, got ", height, " x ", width);
  const int64_t B = grad_centroids.size(0), K = grad_centroids.size(1);
  check_labels(labels, B, height * width, grad_centroids, "grad_centroids");
  check_counts(counts, "counts", B, K, grad_centroids, "grad_centroids");
}

// ---- _label_slots, class_sums -----------------------------------------------------------

inline void check_label_slots_inputs(const at::Tensor& labels, int64_t height, int64_t width, int64_t num_classes) {
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, "height, width: expected sizes >= 0, got ", height, " x ", width);
  TORCH_CHECK_VALUE(num_classes >= 1 && num_classes <= kMaxSlotClasses, "num_classes: expected 1 <= num_classes <= ",
                    kMaxSlotClasses, " (class slots are int16), got ", num_classes);
  check_rank(labels, "labels", 3, "[B, Hy, Wy]");
  check_labels(labels, labels.size(0), height * width, labels, "labels");
}

// slots [B, H, W] int16 (from _label_slots) on ref's device.
inline void check_slots(const at::Tensor& slots, int64_t B, const at::Tensor& ref, const char* ref_name) {
  check_rank(slots, "slots", 3, "[B, H, W]");
  TORCH_CHECK_TYPE(slots.scalar_type() == at::kShort, "slots: expected int16 (from _label_slots), got ",
                   slots.scalar_type());
  TORCH_CHECK_VALUE(slots.size(0) == B, "slots: batch size ", slots.size(0), " differs from ", ref_name,
                    "' batch size ", B);
  check_same_device(slots, "slots", ref, ref_name);
}

inline void check_class_sums_inputs(const at::Tensor& feats, const at::Tensor& slots, int64_t num_classes) {
  check_rank(feats, "feats", 4, "[B, C, H, W]");
  check_floating(feats, "feats");
  TORCH_CHECK_VALUE(num_classes >= 1 && num_classes <= kMaxSlotClasses, "num_classes: expected 1 <= num_classes <= ",
                    kMaxSlotClasses, ", got ", num_classes);
  check_slots(slots, feats.size(0), feats, "feats");
  check_size(slots, "slots", {feats.size(0), feats.size(2), feats.size(3)}, "one class slot per feature pixel");
}

inline void check_class_sums_backward_inputs(const at::Tensor& grad_sums, const at::Tensor& slots,
                                             at::ScalarType dtype) {
  check_rank(grad_sums, "grad_sums", 3, "[B, K, C]");
  check_floating(grad_sums, "grad_sums");
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dtype: expected a floating dtype, got ", dtype);
  TORCH_CHECK_VALUE(grad_sums.size(1) <= kMaxSlotClasses, "grad_sums: at most ", kMaxSlotClasses, " classes, got ",
                    grad_sums.size(1));
  check_slots(slots, grad_sums.size(0), grad_sums, "grad_sums");
}

// ---- class_distance_matrix -------------------------------------------------------------

inline void check_class_distance_matrix_inputs(const at::Tensor& centroids, const at::Tensor& counts, double eps) {
  check_rank(centroids, "centroids", 3, "[B, K, C]");
  check_floating(centroids, "centroids");
  check_counts(counts, "counts", centroids.size(0), centroids.size(1), centroids, "centroids");
  check_eps(eps);
}

inline void check_class_distance_matrix_backward_inputs(const at::Tensor& grad, const at::Tensor& centroids,
                                                        const at::Tensor& counts, double eps) {
  check_class_distance_matrix_inputs(centroids, counts, eps);
  const int64_t B = centroids.size(0), K = centroids.size(1);
  check_floating(grad, "grad");
  check_size(grad, "grad", {B, K, K}, "[B, K, K] like the distance matrix");
  check_same_device(grad, "grad", centroids, "centroids");
}

// ---- idd_loss --------------------------------------------------------------------------

inline void check_idd_loss_inputs(const at::Tensor& student_dist, const at::Tensor& teacher_dist,
                                  const at::Tensor& student_counts, const at::Tensor& teacher_counts) {
  check_rank(student_dist, "student_dist", 3, "[B, K, K]");
  check_floating(student_dist, "student_dist");
  const int64_t B = student_dist.size(0), K = student_dist.size(1);
  check_size(student_dist, "student_dist", {B, K, K}, "square [B, K, K] matrices");
  check_floating(teacher_dist, "teacher_dist");
  check_size(teacher_dist, "teacher_dist", student_dist.sizes(), "the student's [B, K, K]");
  check_same_device(teacher_dist, "teacher_dist", student_dist, "student_dist");
  check_counts(student_counts, "student_counts", B, K, student_dist, "student_dist");
  check_counts(teacher_counts, "teacher_counts", B, K, student_dist, "student_dist");
}

inline void check_idd_loss_backward_inputs(const at::Tensor& grad, const at::Tensor& student_dist,
                                           const at::Tensor& teacher_dist, const at::Tensor& student_counts,
                                           const at::Tensor& teacher_counts, Reduction reduction) {
  check_idd_loss_inputs(student_dist, teacher_dist, student_counts, teacher_counts);
  check_loss_grad(grad, student_dist, "student_dist", reduction, {student_dist.size(0)});
}

// ---- position_encoding_loss ------------------------------------------------------------

// pred [B, M, H, W] with one valid (kind, param) per map.
inline void check_position_encoding_loss_inputs(const at::Tensor& pred, at::IntArrayRef kinds,
                                                at::ArrayRef<double> params) {
  check_rank(pred, "pred", 4, "[B, M, H, W]");
  check_floating(pred, "pred");
  TORCH_CHECK_VALUE(kinds.size() == params.size(), "params: expected one per map kind (", kinds.size(), "), got ",
                    params.size());
  TORCH_CHECK_VALUE(pred.size(1) == static_cast<int64_t>(kinds.size()), "pred: ", pred.size(1), " maps but ",
                    kinds.size(), " map kinds");
  for (size_t m = 0; m < kinds.size(); ++m) {
    const int64_t kind = kinds[m];
    const double p = params[m];
    TORCH_CHECK_VALUE(kind >= 0 && kind < kNumPositionMaps, "kinds: expected map codes in [0, ", kNumPositionMaps,
                      "), got ", kind);
    switch (static_cast<PositionMap>(kind)) {
      case PositionMap::Horizontal:
      case PositionMap::Vertical:
        break;  // no parameter
      // float32 maps take their parameters as float (common/position.h): checked as such
      case PositionMap::Gaussian:  // a sigma that rounds to 0 gave 0 / 0 at the centre
        TORCH_CHECK_VALUE(p >= FLT_MIN && p <= FLT_MAX, "params: map ", m,
                          " (gaussian) needs a sigma in [1.18e-38, 3.4e38] (a normal float32), got ", p);
        break;
      case PositionMap::HorizontalStripes:
      case PositionMap::VerticalStripes:
        // the kernels take the band of row i as int64 (count * i / n): a whole count below 2^31
        TORCH_CHECK_VALUE(p >= 1 && p < 2147483648.0 && p == std::floor(p), "params: map ", m,
                          " (stripes) needs a whole stripe count in [1, 2^31), got ", p);
        break;
      default:  // sinusoids: 2 pi times the frequency must stay a finite float
        TORCH_CHECK_VALUE(std::fabs(p) <= FLT_MAX / 8, "params: map ", m,
                          " (sinusoid) needs a frequency of magnitude <= 4.25e37, got ", p);
    }
  }
}

inline void check_position_encoding_loss_backward_inputs(const at::Tensor& grad, const at::Tensor& pred,
                                                         at::IntArrayRef kinds, at::ArrayRef<double> params,
                                                         Reduction reduction) {
  check_position_encoding_loss_inputs(pred, kinds, params);
  check_loss_grad(grad, pred, "pred", reduction, pred.sizes());
}

// ---- softmax_kl ------------------------------------------------------------------------

// Two [outer, length, inner] tensors of one shape and a positive temperature.
inline void check_softmax_kl_inputs(const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  check_rank(student, "student", 3, "[outer, length, inner]");
  check_floating(student, "student");
  check_floating(teacher, "teacher");
  check_size(teacher, "teacher", student.sizes(), "the student's shape");
  check_same_device(teacher, "teacher", student, "student");
  // 1 / T scales the logits in float32 for float32, half and bfloat16 inputs: it must be finite
  TORCH_CHECK_VALUE(temperature > 0 && temperature < INFINITY && static_cast<float>(1.0 / temperature) < INFINITY,
                    "temperature: expected a finite value >= 2.94e-39 (1 / T must be a finite float32), got ",
                    temperature);
}

inline void check_softmax_kl_backward_inputs(const at::Tensor& grad, const at::Tensor& student,
                                             const at::Tensor& teacher, const at::Tensor& lse_student,
                                             const at::Tensor& lse_teacher, double temperature) {
  check_softmax_kl_inputs(student, teacher, temperature);
  const std::array<int64_t, 2> per_vector{student.size(0), student.size(2)};  // owned: an ArrayRef of a braced list dangles
  const char* why = "[outer, inner], one per vector";
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad, "grad"},
                                {lse_student, "lse_student"},
                                {lse_teacher, "lse_teacher"}}) {
    check_floating(t, name);
    check_size(t, name, per_vector, why);
    check_same_device(t, name, student, "student");
  }
  // the forward's log-sum-exps, read as they are (the incoming gradient is converted): double
  // for every student dtype (common/softmax_kl.h, SoftmaxKLVector)
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse_student, "lse_student"},
                                {lse_teacher, "lse_teacher"}})
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, ": expected dtype torch.float64 (softmax_kl's), got ",
                     t.scalar_type());
}

// ---- affinity_loss ---------------------------------------------------------------------

inline void check_affinity_loss_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t pool) {
  check_rank(student, "student", 4, "[B, Cs, H, W]");
  check_rank(teacher, "teacher", 4, "[B, Ct, H, W]");
  check_floating(student, "student");
  check_floating(teacher, "teacher");
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0) && student.size(2) == teacher.size(2) &&
                        student.size(3) == teacher.size(3),
                    "teacher: expected the student's batch and spatial size, got ", teacher.sizes(), " vs ",
                    student.sizes());
  check_same_device(teacher, "teacher", student, "student");
  TORCH_CHECK_VALUE(pool >= 1, "pool: expected an int >= 1, got ", pool);
  TORCH_CHECK_VALUE(student.size(1) >= 1, "student: expected at least one channel, got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.size(1) >= 1, "teacher: expected at least one channel, got ", teacher.sizes());
}

// `reduced`: _affinity_loss_sum's backward (one loss), else affinity_loss's (one loss per image).
inline void check_affinity_loss_backward_inputs(const at::Tensor& grad, const at::Tensor& student,
                                                const at::Tensor& teacher, const at::Tensor& gram_ss,
                                                const at::Tensor& gram_sd, int64_t pool, bool reduced = false) {
  check_affinity_loss_inputs(student, teacher, pool);
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1);
  check_loss_grad(grad, student, "student", reduced ? Reduction::Sum : Reduction::None, {B});
  check_size(gram_ss, "gram_ss", {B, Cs, Cs}, "[B, Cs, Cs]");
  check_size(gram_sd, "gram_sd", {B, Cs, Ct}, "[B, Cs, Ct]");
  check_floating(gram_ss, "gram_ss");
  check_floating(gram_sd, "gram_sd");
  check_same_device(gram_ss, "gram_ss", student, "student");
  check_same_device(gram_sd, "gram_sd", student, "student");
}

// ---- pixel_centroid_cosine -------------------------------------------------------------

// feats [B, C, H, W] and centroids [B, K, C] on one device (both variants of the op).
inline void check_feats_and_centroids(const at::Tensor& feats, const at::Tensor& centroids) {
  check_rank(feats, "feats", 4, "[B, C, H, W]");
  check_floating(feats, "feats");
  check_rank(centroids, "centroids", 3, "[B, K, C]");
  check_floating(centroids, "centroids");
  const int64_t B = feats.size(0), C = feats.size(1);
  TORCH_CHECK_VALUE(centroids.size(0) == B && centroids.size(2) == C, "centroids: expected [B, K, C] = [", B,
                    ", K, ", C, "], got ", centroids.sizes());
  TORCH_CHECK_VALUE(centroids.size(1) >= 1, "centroids: expected at least one class, got ", centroids.sizes());
  check_same_device(centroids, "centroids", feats, "feats");
}

inline void check_pixel_centroid_cosine_inputs(const at::Tensor& feats, const at::Tensor& centroids,
                                               const at::Tensor& labels, double eps) {
  check_feats_and_centroids(feats, centroids);
  check_labels(labels, feats.size(0), feats.size(2) * feats.size(3), feats, "feats");
  check_eps(eps);
}

// slots [B, H, W] int16 for feats [B, C, H, W]; their values, in [-1, K), are checked where
// they are read (the CPU raises a ValueError, CUDA stops with a device-side assert).
inline void check_pixel_centroid_cosine_slots_inputs(const at::Tensor& feats, const at::Tensor& centroids,
                                                     const at::Tensor& slots, double eps,
                                                     const std::optional<at::Tensor>& counts = std::nullopt) {
  check_feats_and_centroids(feats, centroids);
  check_slots(slots, feats.size(0), feats, "feats");
  check_size(slots, "slots", {feats.size(0), feats.size(2), feats.size(3)}, "one class slot per feature pixel");
  check_eps(eps);
  if (counts) check_counts(*counts, "counts", centroids.size(0), centroids.size(1), feats, "feats");
}

// grad, cos and feat_norms [B, H, W] of feats [B, C, H, W], in the accumulation dtype.
inline void check_pixel_maps(const at::Tensor& grad, const at::Tensor& feats, const at::Tensor& cos,
                             const at::Tensor& feat_norms) {
  const std::array<int64_t, 3> map{feats.size(0), feats.size(2), feats.size(3)};
  const auto acc = acc_dtype(feats.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad, "grad"},
                                {cos, "cos"},
                                {feat_norms, "feat_norms"}}) {
    check_floating(t, name);
    check_size(t, name, map, "[B, H, W], one per pixel");
    check_same_device(t, name, feats, "feats");
  }
  // The forward's saved maps are read raw in the accumulation dtype.
  TORCH_CHECK_TYPE(cos.scalar_type() == acc && feat_norms.scalar_type() == acc, "cos, feat_norms: expected ", acc,
                   " (the forward's outputs), got ", cos.scalar_type(), " and ", feat_norms.scalar_type());
}

inline void check_pixel_centroid_cosine_backward_inputs(const at::Tensor& grad, const at::Tensor& feats,
                                                        const at::Tensor& centroids, const at::Tensor& labels,
                                                        const at::Tensor& cos, const at::Tensor& feat_norms,
                                                        double eps) {
  check_pixel_centroid_cosine_inputs(feats, centroids, labels, eps);
  check_pixel_maps(grad, feats, cos, feat_norms);
}

inline void check_pixel_centroid_cosine_slots_backward_inputs(const at::Tensor& grad, const at::Tensor& feats,
                                                              const at::Tensor& centroids, const at::Tensor& slots,
                                                              const at::Tensor& cos, const at::Tensor& feat_norms,
                                                              double eps,
                                                              const std::optional<at::Tensor>& counts = std::nullopt) {
  check_pixel_centroid_cosine_slots_inputs(feats, centroids, slots, eps, counts);
  check_pixel_maps(grad, feats, cos, feat_norms);
}

// The cosine backward's tensors as every kernel of it reads them: feats contiguous; centroids,
// the incoming gradient and the forward's maps contiguous in the accumulation dtype; grad_f
// (uninitialised, feats' dtype) and grad_c ([B, K, C] in the accumulation dtype: zeros for the
// kernels that add into it, uninitialised where `zero_grad_c` is false) to write.
struct CosineBackwardTensors {
  at::Tensor feats, cent, grad, cos, fnorm, grad_f, grad_c;
};

// All but `cent` (left undefined), for K classes: for a kernel given its centroids' table.
inline CosineBackwardTensors cosine_backward_maps(const at::Tensor& grad, const at::Tensor& feats_in, int64_t K,
                                                  const at::Tensor& cos, const at::Tensor& feat_norms,
                                                  bool zero_grad_c = true) {
  const at::Tensor feats = feats_in.contiguous();
  const auto acc = acc_dtype(feats.scalar_type());
  at::Tensor grad_c = at::empty({feats.size(0), K, feats.size(1)}, feats.options().dtype(acc));
  if (zero_grad_c) grad_c.zero_();
  return {feats, at::Tensor(), grad.to(acc).contiguous(), cos.contiguous(), feat_norms.contiguous(),
          at::empty_like(feats), grad_c};
}

inline CosineBackwardTensors cosine_backward_tensors(const at::Tensor& grad, const at::Tensor& feats,
                                                     const at::Tensor& centroids, const at::Tensor& cos,
                                                     const at::Tensor& feat_norms, bool zero_grad_c = true) {
  CosineBackwardTensors t = cosine_backward_maps(grad, feats, centroids.size(1), cos, feat_norms, zero_grad_c);
  t.cent = centroids.to(acc_dtype(feats.scalar_type())).contiguous();
  return t;
}

}  // namespace idd_ops
