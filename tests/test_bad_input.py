"""Every bad argument raises a clear exception that names it."""
import pytest
import torch

import idd_ops

S = torch.randn(2, 3, 4, 4)
T = torch.randn(2, 5, 4, 4)
Y = torch.randint(0, 3, (2, 8, 8))
K = 3


# the teacher variant of PID: a read-out of T's 5 channels, an adapter from S's 3
PID = idd_ops.nn.PositionDistillationLoss(idd_ops.nn.PositionEncodingModule(5, "horizontal", hidden=4), student_channels=3)


def loss(**kw):
    args = dict(student_feats=S, teacher_feats=T, labels=Y, num_classes=K)
    args.update(kw)
    return idd_ops.inter_class_distance_loss(**args)


CASES = [  # (id, call, exception type, text the message must contain)
    ("student_3d", lambda: loss(student_feats=S[0]), ValueError, "student_feats"),
    ("teacher_5d", lambda: loss(teacher_feats=T[None]), ValueError, "teacher_feats"),
    ("student_int", lambda: loss(student_feats=S.long()), TypeError, "student_feats"),
    ("labels_2d", lambda: loss(labels=Y[0]), ValueError, "labels"),
    ("labels_float", lambda: loss(labels=Y.float()), TypeError, "labels"),
    ("labels_bool", lambda: loss(labels=Y > 0), TypeError, "labels"),
    ("labels_batch", lambda: loss(labels=Y[:1]), ValueError, "labels: batch size"),
    ("teacher_batch", lambda: loss(teacher_feats=T[:1]), ValueError, "teacher_feats: batch size"),
    ("labels_too_big", lambda: loss(labels=torch.full((2, 8, 8), 3)), ValueError, "labels: value 3"),
    ("labels_negative", lambda: loss(labels=torch.full((2, 8, 8), -1)), ValueError, "labels: value -1"),
    ("num_classes_0", lambda: loss(num_classes=0), ValueError, "num_classes"),
    ("num_classes_float", lambda: loss(num_classes=3.0), TypeError, "num_classes"),
    ("ignore_index_str", lambda: loss(ignore_index="255"), TypeError, "ignore_index"),
    ("metric", lambda: loss(metric="manhattan"), ValueError, "metric"),
    ("normalize", lambda: loss(normalize="max"), ValueError, "normalize"),
    ("reduction", lambda: loss(reduction="avg"), ValueError, "reduction"),
    ("eps", lambda: loss(eps=0.0), ValueError, "eps"),
    ("eps_inf", lambda: loss(eps=float("inf")), ValueError, "eps: expected a finite value > 0"),
    ("eps_nan", lambda: loss(eps=float("nan")), ValueError, "eps: expected a finite value > 0"),
    ("labels_empty", lambda: loss(labels=torch.zeros(2, 0, 8, dtype=torch.long)), ValueError, "labels"),
    ("labels_list", lambda: loss(labels=[[0]]), TypeError, "labels"),
    ("centroids_2d", lambda: idd_ops.class_distance_matrix(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)),
     ValueError, "centroids"),
    ("counts_shape", lambda: idd_ops.class_distance_matrix(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.long)),
     ValueError, "counts"),
    ("counts_float", lambda: idd_ops.class_distance_matrix(torch.randn(2, 3, 4), torch.ones(2, 3)), TypeError, "counts"),
    ("centroid_labels_range", lambda: idd_ops.class_centroids(S, torch.full((2, 4, 4), 7), 3), ValueError,
     "labels: value 7"),
    ("ignore_index_past_int64", lambda: loss(ignore_index=2 ** 63), ValueError,
     "ignore_index: expected an int in the int64"),
    ("num_classes_past_int64", lambda: loss(num_classes=2 ** 63), ValueError,
     "num_classes: expected an int in the int64"),
    ("pool_past_int64", lambda: idd_ops.structural_kd_loss(S, S, pool=2 ** 63), ValueError, "pool: expected an int"),
    ("temperature_squared_inf", lambda: idd_ops.pixel_kd_loss(S, S, temperature=2e19), ValueError,
     "temperature: expected a value in"),
    ("cwd_module_student_channels", lambda: idd_ops.nn.ChannelWiseDistillationLoss(3, 5)(T, T), ValueError,
     "student_feats: the module was built for 3 channels, got shape \\(2, 5, 4, 4\\)"),
    ("cwd_module_student_3d", lambda: idd_ops.nn.ChannelWiseDistillationLoss(3, 5)(S[0], T), ValueError,
     "student_feats: expected a 4-D"),
    ("pid_module_batch", lambda: PID(S[:1], T), ValueError, "teacher_feats: batch size 2 differs"),
    ("pid_module_teacher_channels", lambda: PID(S, S), ValueError, "teacher_feats: the module was built for 5"),
    ("pid_module_student_3d", lambda: PID(S[0], T), ValueError, "student_feats: expected a 4-D"),
    ("process_group_type", lambda: loss(centroids="batch", process_group=object()), TypeError,
     "process_group: expected a torch.distributed ProcessGroup"),
    # direct op calls bypass Python validation: the C++ checks still name the argument
    ("op_feats_3d", lambda: torch.ops.idd_ops.class_centroids(S[0], Y, 3, 255), ValueError, "feats"),
    ("op_metric", lambda: torch.ops.idd_ops.class_distance_matrix(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long),
                                                                  "l1", False, 1e-8), ValueError, "metric"),
]


@pytest.mark.parametrize("call,exc,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, text):
    with pytest.raises(exc, match=text):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mismatched_devices():
    with pytest.raises(ValueError, match="labels: on"):
        loss(student_feats=S.cuda(), teacher_feats=T.cuda())
    with pytest.raises(ValueError, match="teacher_feats: on"):
        loss(student_feats=S.cuda(), labels=Y.cuda())


def test_mismatched_devices_meta():
    """Device checks run without a GPU too: meta tensors stand in for a second device."""
    with pytest.raises(ValueError, match="labels: on"):
        loss(student_feats=S.to("meta"), teacher_feats=T.to("meta"))
    with pytest.raises(ValueError, match="teacher_feats: on"):
        loss(teacher_feats=T.to("meta"))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_nan_features_propagate_not_crash(device, metric):
    """A NaN feature gives a NaN loss, not a finite one (the fused CUDA tail once clamped a NaN
    distance to 0)."""
    s = S.clone()
    s[0, 0, 0, 0] = float("nan")
    out = loss(student_feats=s.to(device), teacher_feats=T.to(device), labels=Y.to(device), metric=metric)
    assert torch.isnan(out)
    # the reference too (its euclidean where() once turned a NaN squared distance into 0)
    assert torch.isnan(idd_ops.reference.inter_class_distance_loss(s.double(), T.double(), Y, K, metric=metric))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the CPU's chunk loops
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_at_ignored_pixels_leave_the_gradients(device, value, dtype, layout):
    """The student's gradient with a NaN or inf feature at an ignored pixel: the clean gradient,
    0 at that pixel (METHOD.md 2). The reference's IFVD once gave NaN everywhere (its cosine
    backward carried 0 * NaN into the centroids), and the fused IFVD kernels NaN at that pixel
    (they formed every pixel's gradient as its factors, 0 there, times its features)."""
    y = torch.randint(0, K, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    y[0, 0, 0] = 255
    s = S.to(dtype).clone()
    s[0, :, 0, 0] = value
    t = T.to(dtype)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name in ("inter_class_distance_loss", "intra_class_variation_loss"):
        clean = s.double().nan_to_num(0.0, 0.0, 0.0).requires_grad_()
        getattr(idd_ops.reference, name)(clean, t.double(), y, K).backward()
        for lib in (idd_ops.reference, idd_ops):
            x = s.clone(memory_format=memory_format).to(device).requires_grad_()
            getattr(lib, name)(x, t.to(device), y.to(device), K).backward()
            torch.testing.assert_close(x.grad.cpu().double(), clean.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_at_ignored_pixels_are_ignored(device, value):
    """A NaN or inf feature at an ignored pixel changes nothing: S_bk sums the pixels of class k
    alone (METHOD.md 2). The reference's one-hot product once gave it to every class (0 * NaN)."""
    y = torch.randint(0, K, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    y[0, 0, 0] = 255
    s = S.double().clone()
    s[0, :, 0, 0] = value
    t = T.double().clone()
    t[0, :, 0, 0] = value
    for fn, args in ((idd_ops.inter_class_distance_loss, (s, t)), (idd_ops.intra_class_variation_loss, (s, t)),
                     (idd_ops.class_centroids, (s,))):
        ref = getattr(idd_ops.reference, fn.__name__)
        clean = ref(*(a.nan_to_num(0.0, 0.0, 0.0) for a in args), y, K)
        for impl, x, labels in ((ref, args, y), (fn, [a.to(device) for a in args], y.to(device))):
            got = impl(*x, labels, K)
            for g, w in zip(got if isinstance(got, tuple) else (got,), clean if isinstance(clean, tuple) else (clean,)):
                torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)
