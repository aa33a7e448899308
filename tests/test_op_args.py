"""Every registered op, forward and backward, called directly (no Python validation in front)
with each mismatched argument, stops with an error naming that argument on every device."""
import subprocess
import sys

import pytest
import torch

ops = torch.ops.idd_ops
B, K, C, H, W, P = 2, 4, 3, 5, 6, 7


def valid_args(device):
    """Well-formed arguments of every op: {op name: [args]}."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    feats, labels = randn(B, C, H, W), torch.randint(0, K, (B, H, W), generator=g).to(device)
    counts = torch.randint(1, 5, (B, K), generator=g).to(device)
    cent, dist = randn(B, K, C), randn(B, K, K)
    one = randn(())
    slots = (torch.randint(-1, K, (B, H, W), generator=g)).to(device=device, dtype=torch.int16)
    return {
        "_label_slots": [labels, H, W, K, 255],
        "class_sums": [feats, slots, K],
        "class_sums_pair": [feats, slots, randn(B, C + 1, H, W), slots.clone(), K],
        "_class_sums_backward": [cent, slots, torch.float32, False],
        "class_centroids": [feats, labels, K, 255],
        "_class_centroids_ordered": [feats, labels, K, 255],
        "_class_centroids_backward": [cent, labels, counts, H, W, torch.float32, 255],
        "class_distance_matrix": [cent, counts, "euclidean", False, 1e-8],
        "_class_distance_matrix_backward": [dist, cent, counts, "euclidean", False, 1e-8],
        "idd_loss": [dist, dist.clone(), counts, counts.clone(), "mean"],
        "_idd_loss_backward": [one, dist, dist.clone(), counts, counts.clone(), "mean"],
        "idd_tail": [cent, counts, randn(B, K, C + 1), counts.clone(), "euclidean", True, 1e-8, "mean"],
        "_idd_tail_backward": [one, cent, counts, counts.clone(), randn(B, 2, K, K), randn(B, K + 1, 8, dtype=torch.float64),
                               "euclidean", True, 1e-8, "mean"],
        "position_encoding_loss": [randn(B, 2, H, W), [0, 1], [0.0, 0.0], "mean"],
        "_position_encoding_loss_backward": [one, randn(B, 2, H, W), [0, 1], [0.0, 0.0], "mean"],
        "softmax_kl": [randn(B, C, P), randn(B, C, P), 1.0],
        "_softmax_kl_backward": [randn(B, P), randn(B, C, P), randn(B, C, P), randn(B, P, dtype=torch.float64),
                                 randn(B, P, dtype=torch.float64), 1.0],
        "affinity_loss": [feats, randn(B, C + 1, H, W), 2],
        "_affinity_loss_backward": [randn(B), feats, randn(B, C + 1, H, W), randn(B, C, C), randn(B, C, C + 1), 2],
        "_affinity_loss_sum": [feats, randn(B, C + 1, H, W), 2, True],
        "_affinity_loss_sum_backward": [one, feats, randn(B, C + 1, H, W), randn(B, C, C), randn(B, C, C + 1), 2,
                                        False],
        "pixel_centroid_cosine": [feats, cent, labels, 255, 1e-8],
        "_position_map_code": ["horizontal"],
        "_cpu_capability": [],
        "_pixel_centroid_cosine_backward": [randn(B, H, W), feats, cent, labels, randn(B, H, W), randn(B, H, W),
                                            255, 1e-8],
        "_pixel_centroid_cosine_slots": [feats, cent, slots, 1e-8],
        "_pixel_centroid_cosine_slots_backward": [randn(B, H, W), feats, cent, slots, randn(B, H, W),
                                                  randn(B, H, W), 1e-8],
        "_class_means": [randn(B, K, C, dtype=torch.float64), counts, torch.float32],
        "_class_means_backward": [cent, counts],
        "_ifvd_maps": [feats, randn(B, C + 1, H, W), randn(B, K, C, dtype=torch.float64),
                       randn(B, K, C + 1, dtype=torch.float64), counts, slots, 1e-8],
        "_ifvd_loss": [feats, randn(B, C + 1, H, W), randn(B, K, C, dtype=torch.float64),
                       randn(B, K, C + 1, dtype=torch.float64), counts, slots, 1e-8, True],
        "_ifvd_loss_backward": [one, feats, randn(B, C, K), randn(B, K), slots, randn(B, H, W), randn(B, H, W),
                                randn(B, H, W), counts, 1e-8, True],
        "_pixel_kd_sum": [randn(B, C, P), randn(B, C, P), slots.view(B, H * W)[:, :P].contiguous(), 1.0, True],
        "_pixel_kd_sum_backward": [one, randn(B, C, P), randn(B, C, P), slots.view(B, H * W)[:, :P].contiguous(),
                                   randn(B, P, dtype=torch.float64), randn(B, P, dtype=torch.float64),
                                   randn((), dtype=torch.float64), 1.0],
    }


def _t(shape, dtype=torch.float32):
    return lambda a: torch.zeros(shape, dtype=dtype, device=a.device)


def _dtype(dtype):
    return lambda a: a.to(dtype)


# (op, argument position, replacement (a function of the valid argument, or a value),
#  exception, text the message must contain)
CASES = [
    ("class_centroids", 0, _t((B, C, H)), ValueError, "feats"),
    ("class_centroids", 0, _dtype(torch.int64), TypeError, "feats"),
    ("class_centroids", 1, _t((B + 1, H, W), torch.int64), ValueError, "labels: batch"),
    ("class_centroids", 1, _dtype(torch.float32), TypeError, "labels"),
    ("class_centroids", 2, 0, ValueError, "num_classes"),
    ("_class_centroids_ordered", 1, _t((B, H), torch.int64), ValueError, "labels"),
    ("_class_centroids_backward", 0, _t((B, K)), ValueError, "grad_centroids"),
    ("_class_centroids_backward", 1, _t((B + 1, H, W), torch.int64), ValueError, "labels: batch"),
    ("_class_centroids_backward", 1, _t((B, 0, W), torch.int64), ValueError, "labels: spatial"),
    ("_class_centroids_backward", 2, _t((B, K + 1), torch.int64), ValueError, "counts"),
    ("_class_centroids_backward", 2, _dtype(torch.int32), TypeError, "counts"),
    ("_class_centroids_backward", 3, -1, ValueError, "height"),
    ("_class_centroids_backward", 5, torch.int64, TypeError, "dtype"),
    ("_class_centroids_backward", 0, _dtype(torch.float16), TypeError, "grad_centroids: expected dtype Float"),
    ("_label_slots", 0, _dtype(torch.float32), TypeError, "labels"),
    ("_label_slots", 0, _t((B, H), torch.int64), ValueError, "labels"),
    ("_label_slots", 1, -1, ValueError, "height"),
    ("_label_slots", 3, 0, ValueError, "num_classes"),
    ("_label_slots", 3, 40000, ValueError, "num_classes"),
    ("class_sums", 0, _t((B, C, H)), ValueError, "feats"),
    ("class_sums", 0, _dtype(torch.int64), TypeError, "feats"),
    ("class_sums", 1, _dtype(torch.int64), TypeError, "slots"),
    ("class_sums", 1, _t((B, H, W + 1), torch.int16), ValueError, "slots"),
    ("class_sums", 1, _t((B + 1, H, W), torch.int16), ValueError, "slots: batch"),
    ("class_sums", 2, 0, ValueError, "num_classes"),
    ("class_sums_pair", 2, _dtype(torch.int64), TypeError, "feats"),
    ("class_sums_pair", 3, _t((B, H + 1, W), torch.int16), ValueError, "slots"),
    ("_class_sums_backward", 0, _t((B, K)), ValueError, "grad_sums"),
    ("_class_sums_backward", 1, _t((B + 1, H, W), torch.int16), ValueError, "slots: batch"),
    ("_class_sums_backward", 2, torch.int64, TypeError, "dtype"),
    ("class_distance_matrix", 0, _t((B, K)), ValueError, "centroids"),
    ("class_distance_matrix", 0, _dtype(torch.int64), TypeError, "centroids"),
    ("class_distance_matrix", 1, _t((B, K + 1), torch.int64), ValueError, "counts"),
    ("class_distance_matrix", 1, _t((B + 1, K), torch.int64), ValueError, "counts"),
    ("class_distance_matrix", 1, _dtype(torch.float32), TypeError, "counts"),
    ("class_distance_matrix", 2, "l1", ValueError, "metric"),
    ("class_distance_matrix", 4, -1.0, ValueError, "eps"),
    ("class_distance_matrix", 4, 0.0, ValueError, "eps"),
    ("_class_distance_matrix_backward", 0, _t((B, K, K + 1)), ValueError, "grad"),
    ("_class_distance_matrix_backward", 0, _dtype(torch.int64), TypeError, "grad"),
    ("_class_distance_matrix_backward", 2, _t((B, K + 1), torch.int64), ValueError, "counts"),
    ("idd_loss", 0, _t((B, K, K + 1)), ValueError, "student_dist"),
    ("idd_loss", 1, _t((1, K, K)), ValueError, "teacher_dist"),  # once read past the end of a buffer
    ("idd_loss", 1, _dtype(torch.int64), TypeError, "teacher_dist"),
    ("idd_loss", 2, _t((B, K + 1), torch.int64), ValueError, "student_counts"),
    ("idd_loss", 3, _t((1, K), torch.int64), ValueError, "teacher_counts"),
    ("idd_loss", 3, _dtype(torch.float32), TypeError, "teacher_counts"),
    ("idd_loss", 4, "avg", ValueError, "reduction"),
    ("_idd_loss_backward", 0, _t((3,)), ValueError, "grad"),
    ("_idd_loss_backward", 2, _t((B, K + 1, K + 1)), ValueError, "teacher_dist"),
    ("_idd_loss_backward", 4, _t((B, 1), torch.int64), ValueError, "teacher_counts"),
    ("idd_tail", 0, _t((B, K)), ValueError, "student_sums"),
    ("idd_tail", 2, _t((B, K + 1, C)), ValueError, "teacher_sums"),
    ("idd_tail", 3, _dtype(torch.float32), TypeError, "teacher_counts"),
    ("idd_tail", 4, "cityblock", ValueError, "metric"),
    ("_idd_tail_backward", 0, _t((3,)), ValueError, "grad"),
    ("_idd_tail_backward", 4, _t((B, 2, K, K + 1)), ValueError, "dist"),
    ("position_encoding_loss", 0, _t((B, 2, H)), ValueError, "pred"),
    ("position_encoding_loss", 0, _dtype(torch.int64), TypeError, "pred"),
    ("position_encoding_loss", 1, [0], ValueError, "params"),
    ("position_encoding_loss", 1, [0, 99], ValueError, "kinds"),
    ("position_encoding_loss", 2, [0.0], ValueError, "params"),
    ("_position_encoding_loss_backward", 0, _t((2,)), ValueError, "grad"),
    ("_position_encoding_loss_backward", 1, _t((B, 3, H, W)), ValueError, "pred"),
    ("softmax_kl", 0, _t((B, C)), ValueError, "student"),
    ("softmax_kl", 1, _t((B, C, P + 1)), ValueError, "teacher"),
    ("softmax_kl", 1, _dtype(torch.int64), TypeError, "teacher"),
    ("softmax_kl", 2, 0.0, ValueError, "temperature"),
    ("softmax_kl", 2, 1e-300, ValueError, "temperature: .*finite float32"),  # 1 / T was inf: NaN losses
    ("_softmax_kl_backward", 0, _t((B, P + 1)), ValueError, "grad"),
    ("_softmax_kl_backward", 3, _t((B + 1, P)), ValueError, "lse_student"),
    ("_softmax_kl_backward", 4, _dtype(torch.int64), TypeError, "lse_teacher"),
    ("_softmax_kl_backward", 3, _dtype(torch.float32), TypeError, "lse_student: expected dtype torch.float64"),
    ("affinity_loss", 1, _t((B, C, H, W + 1)), ValueError, "teacher"),
    ("affinity_loss", 1, _t((B, C, H * W)), ValueError, "teacher"),
    ("affinity_loss", 2, 0, ValueError, "pool"),
    ("affinity_loss", 0, _t((B, 0, H, W)), ValueError, "student: expected at least one channel"),
    ("affinity_loss", 1, _t((B, 0, H, W)), ValueError, "teacher: expected at least one channel"),
    ("affinity_loss", 0, _dtype(torch.int64), TypeError, "student"),
    ("_class_means", 0, _t((B, K)), ValueError, "sums"),
    ("_class_means", 0, _dtype(torch.float32), TypeError, "sums: expected float64"),
    ("_class_means", 1, _t((B, K + 1), torch.int64), ValueError, "counts"),
    ("_class_means", 1, _dtype(torch.int32), TypeError, "counts"),
    ("_class_means", 2, torch.int64, TypeError, "dtype"),
    ("_class_means_backward", 0, _t((B, K)), ValueError, "grad"),
    ("_class_means_backward", 0, _dtype(torch.int64), TypeError, "grad"),
    ("_class_means_backward", 1, _t((B + 1, K), torch.int64), ValueError, "counts"),
    ("_ifvd_maps", 0, _t((B, C, H)), ValueError, "student"),
    ("_ifvd_maps", 0, _dtype(torch.int64), TypeError, "student"),
    ("_ifvd_maps", 1, _dtype(torch.float64), TypeError, "teacher: expected the student's dtype"),
    ("_ifvd_maps", 1, _t((B, C + 1, H, W + 1)), ValueError, "teacher: expected the student's batch"),
    ("_ifvd_maps", 2, _dtype(torch.float32), TypeError, "student_sums: expected float64"),
    ("_ifvd_maps", 2, _t((B, K), torch.float64), ValueError, "student_sums"),
    ("_ifvd_maps", 2, _t((B, 0, C), torch.float64), ValueError, "student_sums: expected 1 to 32767 classes"),
    ("_ifvd_maps", 3, _t((B, K, C), torch.float64), ValueError, "teacher_sums"),
    ("_ifvd_maps", 3, _dtype(torch.float32), TypeError, "teacher_sums: expected float64"),
    ("_ifvd_maps", 4, _t((B, K + 1), torch.int64), ValueError, "counts"),
    ("_ifvd_maps", 4, _dtype(torch.int32), TypeError, "counts"),
    ("_ifvd_maps", 5, _t((B, H, W + 1), torch.int16), ValueError, "slots"),
    ("_ifvd_maps", 5, _dtype(torch.int64), TypeError, "slots"),
    ("_ifvd_maps", 6, 0.0, ValueError, "eps"),
    ("_ifvd_loss", 0, _t((B, C, H)), ValueError, "student"),
    ("_ifvd_loss", 1, _dtype(torch.float64), TypeError, "teacher: expected the student's dtype"),
    ("_ifvd_loss", 3, _t((B, K, C), torch.float64), ValueError, "teacher_sums"),
    ("_ifvd_loss", 5, _dtype(torch.int64), TypeError, "slots"),
    ("_ifvd_loss", 6, 0.0, ValueError, "eps"),
    ("_ifvd_loss_backward", 0, _t((B,)), ValueError, "grad: expected one value"),
    ("_ifvd_loss_backward", 0, _dtype(torch.int64), TypeError, "grad"),
    ("_ifvd_loss_backward", 1, _t((B, C, H)), ValueError, "student"),
    ("_ifvd_loss_backward", 2, _t((B, K, C + 1)), ValueError, "student_table"),
    ("_ifvd_loss_backward", 2, _dtype(torch.float64), TypeError, "student_table"),
    ("_ifvd_loss_backward", 3, _t((B, K + 1)), ValueError, "student_norms"),
    ("_ifvd_loss_backward", 3, _dtype(torch.float64), TypeError, "student_norms"),
    ("_ifvd_loss_backward", 4, _dtype(torch.int64), TypeError, "slots"),
    ("_ifvd_loss_backward", 5, _t((B, H, W + 1)), ValueError, "cos_student"),
    ("_ifvd_loss_backward", 6, _t((B, H + 1, W)), ValueError, "cos_teacher"),
    ("_ifvd_loss_backward", 6, _dtype(torch.float64), TypeError, "cos_teacher"),
    ("_ifvd_loss_backward", 7, _t((B, H)), ValueError, "feat_norms"),
    ("_ifvd_loss_backward", 8, _t((B, K + 1), torch.int64), ValueError, "counts"),
    ("_ifvd_loss_backward", 9, 0.0, ValueError, "eps"),
    ("_affinity_loss_backward", 0, _t(()), ValueError, "grad"),
    ("_affinity_loss_backward", 3, _t((B, C, C + 1)), ValueError, "gram_ss"),
    ("_affinity_loss_backward", 4, _t((B, C, C)), ValueError, "gram_sd"),
    ("_affinity_loss_sum", 1, _t((B + 1, C, H, W)), ValueError, "teacher"),
    ("_affinity_loss_sum", 2, 0, ValueError, "pool"),
    ("_affinity_loss_sum", 0, _dtype(torch.int64), TypeError, "student"),
    ("_affinity_loss_sum_backward", 0, _t((B,)), ValueError, "grad: expected one value"),
    ("_affinity_loss_sum_backward", 0, _dtype(torch.int64), TypeError, "grad"),
    ("_affinity_loss_sum_backward", 3, _t((B, C + 1, C)), ValueError, "gram_ss"),
    ("_affinity_loss_sum_backward", 4, _t((B, C, C)), ValueError, "gram_sd"),
    ("pixel_centroid_cosine", 1, _t((B, K, C + 1)), ValueError, "centroids"),
    ("pixel_centroid_cosine", 1, _t((B + 1, K, C)), ValueError, "centroids"),
    ("pixel_centroid_cosine", 2, _t((B + 1, H, W), torch.int64), ValueError, "labels: batch"),
    ("pixel_centroid_cosine", 4, -1.0, ValueError, "eps"),
    ("_position_map_code", 0, "diagonal", ValueError, "name"),
    ("_pixel_centroid_cosine_backward", 0, _t((B, H, W + 1)), ValueError, "grad"),
    ("_pixel_centroid_cosine_backward", 4, _t((B, H + 1, W)), ValueError, "cos"),
    ("_pixel_centroid_cosine_backward", 5, _dtype(torch.float64), TypeError, "feat_norms"),
    ("_pixel_centroid_cosine_backward", 2, _t((B, K, C + 2)), ValueError, "centroids"),
    ("_pixel_centroid_cosine_slots", 1, _t((B, K, C + 1)), ValueError, "centroids"),
    ("_pixel_centroid_cosine_slots", 2, _t((B, H, W + 1), torch.int16), ValueError, "slots: expected shape"),
    ("_pixel_centroid_cosine_slots", 2, _t((B + 1, H, W), torch.int16), ValueError, "slots: batch"),
    ("_pixel_centroid_cosine_slots", 2, _dtype(torch.int64), TypeError, "slots: expected int16"),
    ("_pixel_centroid_cosine_slots", 3, 0.0, ValueError, "eps"),
    ("_pixel_centroid_cosine_slots_backward", 0, _t((B, H, W + 1)), ValueError, "grad"),
    ("_pixel_centroid_cosine_slots_backward", 3, _t((B, H, W + 1), torch.int16), ValueError, "slots"),
    ("_pixel_centroid_cosine_slots_backward", 5, _dtype(torch.float64), TypeError, "feat_norms"),
    ("_pixel_kd_sum", 0, _t((B, C)), ValueError, "student"),
    ("_pixel_kd_sum", 1, _t((B, C, P + 1)), ValueError, "teacher"),
    ("_pixel_kd_sum", 2, _t((B, P + 1), torch.int16), ValueError, "slots: expected shape"),
    ("_pixel_kd_sum", 2, _dtype(torch.int64), TypeError, "slots: expected int16"),
    ("_pixel_kd_sum", 3, 0.0, ValueError, "temperature"),
    ("_pixel_kd_sum_backward", 0, _t((B,)), ValueError, "grad"),
    ("_pixel_kd_sum_backward", 3, _t((B + 1, P), torch.int16), ValueError, "slots"),
    ("_pixel_kd_sum_backward", 4, _t((B, P + 1), torch.float64), ValueError, "lse_student"),
    ("_pixel_kd_sum_backward", 5, _dtype(torch.float32), TypeError, "lse_teacher: expected dtype torch.float64"),
    ("_pixel_kd_sum_backward", 6, _t((1,), torch.float64), ValueError, "factor"),
    ("_pixel_kd_sum_backward", 6, _dtype(torch.float32), TypeError, "factor: expected dtype torch.float64"),
]


def _call(name, args):
    return getattr(ops, name)(*args)


@pytest.mark.parametrize("name", sorted(valid_args("cpu")))
def test_valid_arguments_run(device, name):
    """The baseline of every case below: without the bad argument the call succeeds."""
    _call(name, valid_args(device)[name])


@pytest.mark.parametrize("name,pos,bad,exc,text", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[4].split(':')[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument(device, name, pos, bad, exc, text):
    args = valid_args(device)[name]
    args[pos] = bad(args[pos]) if callable(bad) and not isinstance(bad, torch.dtype) else bad
    with pytest.raises(exc, match=text):
        _call(name, args)


def test_error_messages_are_formatted_in_full(device):
    """Numbers and shapes reach the message. In a child process: an extension that carries its
    own static copy of libstdc++ loses or crashes on them (setup.py links it dynamically)."""
    code = ("import torch, idd_ops\n"
            "try:\n"
            f"    torch.ops.idd_ops.class_centroids(torch.zeros(2, 3, 5, device='{device}'),\n"
            f"        torch.zeros(2, 5, 6, dtype=torch.long, device='{device}'), 4, 255)\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "feats: expected a 4-D [B, C, H, W] tensor, got shape [2, 3, 5]" in proc.stdout, proc.stdout


def test_every_op_is_covered():
    # From the dispatcher's registry: dir(ops) lists only the ops this process has touched.
    schemas = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("idd_ops::")}
    assert schemas == set(valid_args("cpu")), schemas ^ set(valid_args("cpu"))
    assert {c[0] for c in CASES} == schemas - {"_cpu_capability"}  # the one op without arguments


def _tensor_args(args):
    return [pos for pos, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() > 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(n for n, a in valid_args("cpu").items() if len(_tensor_args(a)) >= 2))
def test_tensor_on_another_device(name):
    """Any one tensor left on the CPU beside CUDA tensors is refused before a kernel runs (ops
    with two or more tensor arguments: one alone on the CPU is simply a CPU call)."""
    args = valid_args("cuda")[name]
    for pos in _tensor_args(args):
        moved = list(args)
        moved[pos] = args[pos].cpu()
        with pytest.raises(ValueError, match="on cpu"):
            _call(name, moved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("call", [
    "idd_ops.class_centroids(x, y, 3)",
    "torch.ops.idd_ops._class_centroids_backward(torch.ones(1, 3, 2, device='cuda'), y, "
    "torch.ones(1, 3, dtype=torch.long, device='cuda'), 4, 4, torch.float32, 255)",
    "torch.ops.idd_ops.pixel_centroid_cosine(x, torch.ones(1, 3, 2, device='cuda'), y, 255, 1e-8)",
    "torch.ops.idd_ops._label_slots(y, 4, 4, 3, 255)",
    "torch.ops.idd_ops._pixel_centroid_cosine_slots(x, torch.ones(1, 3, 2, device='cuda'), y.short(), 1e-8)",
])
def test_cuda_labels_out_of_range_stop_with_a_device_assert(call):
    """Labels (or a slot map, the last call) out of range, as nll_loss does: no host sync, a device-side assert (which ends the CUDA context, hence
    a child process). The CPU raises a ValueError instead (test_bad_input)."""
    code = ("import torch, idd_ops\n"
            "x = torch.randn(1, 2, 4, 4, device='cuda')\n"
            "y = torch.full((1, 4, 4), 7, device='cuda')\n"
            f"{call}\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "device-side assert" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_idd_loss_accepts_half_and_bfloat16(device, dtype):
    """Low-precision distance matrices are accepted (accumulated in float32), value and gradient."""
    args = valid_args(device)["idd_loss"]
    ds, dt = args[0].to(dtype).requires_grad_(), args[1].to(dtype)
    for reduction in ("mean", "sum", "none"):
        ds.grad = None
        loss = ops.idd_loss(ds, dt, args[2], args[3], reduction)
        loss.float().sum().backward()
        want_ds = ds.detach().double().requires_grad_()
        want = ops.idd_loss(want_ds, dt.double(), args[2], args[3], reduction)
        want.sum().backward()
        assert loss.dtype == dtype and ds.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ds.grad.double(), want_ds.grad, rtol=2e-2, atol=2e-2)
