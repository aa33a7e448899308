"""The benchmark machinery itself: roofline bounds, the profiler's peak memory, the memory check,
label generators, the report's rows and the training-step script. Small inputs, no timings
asserted."""
import argparse
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside tests/, off the path under plain `pytest`

from benchmarks import cases, common, kernel_times, peak, report, roofline, sweep, train_step  # noqa: E402
import idd_ops  # noqa: E402
from idd_ops import reference  # noqa: E402


def test_bound_names_the_larger_term():
    work = roofline.Work(bytes=2e9, flops=4e9, exps=1e9, gemm_shape=(1, 2, 3, 4))
    # 2e9 B at 1e9 B/s = 2 s; 4e9 flop at 1e12 = 4 ms; 1e9 exps at 1e10 = 100 ms
    ms, by = roofline.bound(work, 1e9, 1e12, 1e10)
    assert by == "memory" and ms == pytest.approx(2000.0)
    ms, by = roofline.bound(work, 1e12, 1e9, 1e10)
    assert by == "GEMM" and ms == pytest.approx(4000.0)
    ms, by = roofline.bound(work, 1e12, 1e12, 1e8)
    assert by == "exp" and ms == pytest.approx(10000.0)


def test_bound_ignores_rates_of_work_it_does_not_have():
    ms, by = roofline.bound(roofline.Work(bytes=1e6), 1e9, None, 1e9)
    assert by == "memory" and ms == pytest.approx(1.0)


def test_rates_measure_each_gemm_shape_once(monkeypatch):
    rates = roofline.Rates.__new__(roofline.Rates)
    rates.device, rates.exp_eps, rates.gemm_fps = "cpu", 1e9, {}
    calls = []
    monkeypatch.setattr(roofline, "gemm_rate", lambda shape, device: calls.append(shape) or 1e9)
    work = roofline.Work(bytes=1, flops=1e9, gemm_shape=(2, 4, 8, 4))
    ms, by = rates.bound(work, 1e9)
    assert by == "GEMM" and ms == pytest.approx(1000.0)
    rates.bound(work, 1e9)
    assert calls == [(2, 4, 8, 4)] and "bmm 2x4x8x4" in rates.describe()


def test_skd_work_counts_its_gram_products():
    case = cases.Case("skd x", "", [torch.zeros(1)], None, flops=(30, 20), gemm_shape=(1, 2, 3, 2))
    assert case.work(False).flops == 30 and case.work(True).flops == 50
    assert case.work(True).bytes == 8 and case.work(True).gemm_shape == (1, 2, 3, 2)
    assert cases.Case("x", "", [torch.zeros(1)], None).work(True).gemm_shape is None


def test_running_peak():
    assert peak.running_peak([]) == 0
    assert peak.running_peak([-5, 3]) == 0
    assert peak.running_peak([4, -4, 3, 2, -1]) == 5


def test_peak_covers_the_returned_tensor(device):
    n = 3_000_000
    peak_bytes, returned = peak.measure(lambda: torch.ones(n, device=device), device)
    assert returned == 4 * n and peak_bytes >= 4 * n


def test_the_gpu_exp_probe_parses():
    # jiterator parses the code where it is created; the GPU compiles and runs it (GPU test below)
    assert torch.cuda.jiterator._create_jit_fn(roofline._EXP_CHAINS).kernel_name == "exp_chains"


def test_measured_rates_are_positive_on_the_device(device):
    assert roofline.gemm_rate((1, 32, 32, 32), device, repeat=1) > 0
    assert roofline.gemm_rate((1, 32, 32, 32, "float64"), device, repeat=1) > 0  # the IDD Grams' dtype
    rate, source = roofline.exp_rate(device, samples=1)
    # on a GPU, the chain kernel: its fallback (torch.exp) is bound by L2 rather than the exp units
    expected = "torch.exp" if torch.device(device).type == "cpu" else f"{roofline.CHAIN_STEPS * 4} expf per element"
    assert rate > 0 and source.startswith(expected)


def test_best_ms_times_loops_of_calls_that_last_min_ms(monkeypatch):
    """On a GPU each timing is a loop of back-to-back calls (one call would time its launch and
    synchronise): the calls double until a loop lasts min_ms, and the time is per call."""
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    calls = []

    def fn():  # 0.3 ms of (fake) time a call
        calls.append(1)
        clock[0] += 0.3e-3
    assert roofline.best_ms(fn, "cpu", samples=2, min_ms=1.0) == pytest.approx(0.3)
    # one warm-up, loops of 1, 2 and 4 calls (the first to last 1 ms), two timed loops of 4
    assert len(calls) == 1 + 1 + 2 + 4 + 2 * 4
    calls.clear()
    assert roofline.best_ms(fn, "cpu", samples=3) == pytest.approx(0.3) and len(calls) == 1 + 3  # CPU: a call


def test_the_forward_backward_harness_adds_no_op_to_the_call():
    """forward+backward rows time the op and its backward alone: a non-scalar output's backward
    (class_centroids) is seeded with ones made once, not through a sum of the output (a kernel and
    its backward in every call); the ops profiled are those of the bare call."""
    from collections import Counter

    from torch.profiler import profile
    f, y = torch.randn(2, 4, 4, 8), torch.randint(0, 3, (2, 8, 16))
    run = cases.Case("class_centroids", "", [f, y], lambda m, f, y: m.class_centroids(f, y, 3)[0]).build(
        "fused", backward=True)
    seed = torch.ones(2, 3, 4)

    def bare():
        f.grad = None
        idd_ops.class_centroids(f, y, 3)[0].backward(seed)

    def ops(fn):
        fn()
        with profile() as prof:
            fn()
        return Counter(e.name for e in prof.events())
    assert ops(run) == ops(bare)


def test_peak_counts_temporaries_and_gradients(device):
    x = torch.randn(500, 400, device=device, requires_grad=True)

    def call():
        loss = (x * 2).exp().sum()  # two [500, 400] temporaries live at once
        loss.backward()
        return loss

    peak_bytes, returned = peak.measure(call, device, held=lambda: [x.grad])
    assert returned == 4 + x.numel() * 4
    assert peak_bytes >= 2 * x.numel() * 4


def test_peak_does_not_depend_on_what_the_heap_held_before():
    def call():
        return torch.ones(2_000_000) + 1
    first = peak.measure(call)[0]
    junk = [torch.empty(1_000_000) for _ in range(4)]
    del junk  # freed memory a later call could reuse, which a resident-set measurement would miss
    assert peak.measure(call)[0] == first


def test_below_returned_flags_impossible_entries():
    rows = [dict(case="a", mode="forward", fused_peak=10, fused_returned=8, reference_peak=7, reference_returned=8),
            dict(case="b", mode="forward+backward", fused_peak=0, fused_returned=4)]
    assert peak.below_returned(rows, cases.IMPLS) == [("a", "forward", "reference"), ("b", "forward+backward", "fused")]


def test_fragmented_labels_are_random_per_feature_pixel():
    y = common.fragmented_labels(2, 8, 16, 64, 128, K=19, seed=1)
    assert y.shape == (2, 64, 128) and y.dtype == torch.long
    small = reference.resize_labels(y, (8, 16))
    assert small.min() >= 0 and small.max() < 19
    # neighbours differ about (K-1)/K of the time; street layouts differ on a few boundaries only
    assert (small[:, :, 1:] != small[:, :, :-1]).float().mean() > 0.8
    with pytest.raises(ValueError, match="multiple"):
        common.fragmented_labels(1, 3, 3, 8, 8, K=2)
    with pytest.raises(ValueError, match="labels"):
        common.make_inputs((1, 2, 2, 4, 4, 8, 8, 3), labels="blobs")


def _tiny_idd_case(peer=None):
    s, t, y, K = common.make_inputs((2, 8, 16, 8, 8, 16, 16, 5))
    return cases.Case("idd_loss tiny", "tiny", [s, t, y], lambda m, s, t, y: m.inter_class_distance_loss(s, t, y, K),
                      flops=(100, 50), gemm_shape=(2, 5, 16, 5), peer=peer)


class _FixedRates:
    def bound(self, work, copy_bps):
        return roofline.bound(work, copy_bps, 1e9, 1e9)

    def describe(self):
        return "exp 1.0 G/s"


def test_report_row_and_table():
    case = _tiny_idd_case(peer=("torch_scatter.scatter_mean", None, False))
    probe = common.CopyProbe("cpu")
    row = report.measure_row(case, True, "cpu", repeat=1, compiled=False, rates=_FixedRates(), probe=probe)
    grad_bytes = case.inputs[0].numel() * 4
    assert row["fused_returned"] >= grad_bytes and row["fused_peak"] >= row["fused_returned"]
    assert row["reference_peak"] >= row["reference_returned"] >= grad_bytes
    assert row["bound_by"] == "memory" and peak.below_returned([row], cases.IMPLS) == []
    assert row["copy_gbs"] > 0 and row["bound_ms"] == pytest.approx(case.work(True).bytes / (row["copy_gbs"] * 1e6))
    text = report.table([row, dict(row, fused_peak=0)])
    assert "not installed" in text and "| memory |" in text
    assert text.count(" ! |") == 1  # the impossible fused entry of the second row
    head = report.header("cpu", 1, False, _FixedRates(), [row], "results/x/RESULTS.md")
    assert peak.METHOD in head and "exp 1.0 G/s" in head and "(../../benchmarks/TRAIN_STEP.md)" in head


def test_scatter_mean_peer_matches_class_centroids(monkeypatch):
    def scatter_mean(src, index, dim, dim_size):  # torch_scatter's semantics, in torch
        sums = torch.zeros(*src.shape[:dim], dim_size, dtype=src.dtype).scatter_add(dim, index, src)
        counts = torch.zeros_like(sums).scatter_add(dim, index, torch.ones_like(src))
        return sums / counts.clamp_min(1)
    monkeypatch.setitem(sys.modules, "torch_scatter", types.SimpleNamespace(scatter_mean=scatter_mean))
    assert cases.torch_scatter_installed()
    feats, _, labels, K = common.make_inputs((2, 4, 6, 8, 8, 32, 32, 5))
    got = cases.scatter_mean_centroids(feats, labels, K)
    torch.testing.assert_close(got, reference.class_centroids(feats, labels, K)[0])


def test_train_step_runs_and_tables():
    data = train_step.make_data(1)
    step, params = train_step.make_step(data, "kd", reference)
    before = [p.detach().clone() for p in params]
    step()
    assert all(p.grad is not None for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    with pytest.raises(ValueError, match="loss must be one of"):
        train_step.distill_term("nope", reference, "cpu")
    peaks = lambda f: dict(ce_peak=100, ce_grads=50, fused_peak=f, fused_grads=60, reference_peak=300,  # noqa: E731
                           reference_grads=60)
    text = train_step.table([dict(loss="kd", ce_ms=10.0, fused_ms=12.0, reference_ms=15.0, **peaks(200)),
                             dict(loss="idd", ce_ms=10.0, fused_ms=11.0, reference_ms=14.0, **peaks(40))])
    assert "| kd | 10 | 12 | 15 | 1.25x | 2.0 | 5.0 | 16.7% | 33.3% |" in text and text.count(" !") == 1


def test_copy_probe_counts_read_and_write():
    probe = common.CopyProbe("cpu")
    probe()
    assert torch.equal(probe.dst, probe.src)
    assert probe.rate(1.0) == pytest.approx(2 * 2**28 / 1e-3)  # 256 MiB read and written in 1 ms


def test_allocator_option():
    assert common.apply_allocator_option(argparse.Namespace(system_malloc=True)) == common.SYSTEM_MALLOC_NOTE
    # in a child process: it changes how the process's C allocator returns memory
    code = "from benchmarks import common; print(common.retain_freed_memory())"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")


def test_peak_below_the_returned_bytes_is_measured_again(monkeypatch):
    results = iter([(1, 2), (3, 2), (5, 2)])
    monkeypatch.setattr(peak, "_measure_once", lambda fn, device, held: next(results))
    calls = []
    assert peak.measure(None, attempts=3, before=lambda: calls.append(1)) == (3, 2) and len(calls) == 2
    results = iter([(1, 2), (1, 2)])
    assert peak.measure(None, attempts=2) == (1, 2)  # still below: reported as it is, marked by the report


# ---- the GPU guard: targets, kernel-set columns, the training step's real-network path

def _row(case, mode="forward+backward", fused=1.0, reference=2.0, compiled=1.5, bound=0.9, **extra):
    return dict(case=case, desc="", mode=mode, fused_ms=fused, reference_ms=reference, compiled_ms=compiled,
                bound_ms=bound, bound_by="memory", copy_gbs=1.0, **extra)


def test_targets_pass_rows_that_meet_them():
    from benchmarks import targets
    rows = [_row("cwd", "forward"), _row("cwd"),
            _row("idd_loss cityscapes", fused=0.3, reference=3.0, compiled=1.0, bound=0.2, fused_launches=6,
                 fused_host_ms=0.05),
            _row("idd_loss cityscapes fragmented", fused=0.38, reference=3.0, compiled=1.0, bound=0.2),
            _row("skd pool2", fused=1.4, reference=4.0, compiled=3.0, bound=1.0)]
    assert targets.check(rows) == []


def test_targets_name_the_row_the_kernel_set_and_the_issue():
    from benchmarks import targets
    rows = [_row("cwd", fused=2.5, reference=2.0, compiled=3.0),  # slower than its eager reference
            _row("idd_loss cityscapes", fused=0.3, reference=3.0, compiled=0.8, bound=0.2, fused_launches=9,
                 fused_host_ms=0.05, fused_next_ms=0.25, fused_next_launches=5, fused_next_host_ms=0.04),
            _row("idd_loss cityscapes fragmented", fused=0.5, reference=3.0, compiled=2.0, bound=0.2,
                 fused_next_ms=0.3)]
    misses = targets.check(rows, ("fused", "fused_next"))
    guard = targets.guard_failures(misses)
    assert len(guard) == 1 and guard[0].startswith("cwd forward+backward [default kernels]: speed-up vs eager "
                                                   "reference 0.80x, target >= 1.00x (issue 22 item 6 (guard)")
    text = "\n".join(misses)
    assert "idd_loss cityscapes forward+backward [default kernels]: launches per call 9.0, target <= 6.0" in text
    slow_host = [_row("idd_loss cityscapes", fused=0.3, reference=3.0, compiled=1.0, bound=0.2, fused_launches=6,
                      fused_host_ms=0.3, floor_host_ms=0.12)]
    assert targets.check(slow_host) == [
        "idd_loss cityscapes forward+backward [default kernels]: host ms per call 0.300; torch floor 0.120, "
        "target <= 0.100 (issue 21 item 3: IDD forward+backward at most 0.1 ms of host time per call)"]
    assert "at least 3x faster than torch.compile(reference)" in text  # 0.8 / 0.3 = 2.7x
    assert "idd_loss cityscapes fragmented forward+backward [default kernels]: time / street labels 1.67x" in text
    # the next kernels meet every target on these rows (1.2x street, 5 launches, 3.2x compile)
    assert not [m for m in misses if "IDD_OPS_CUDA_NEXT=1" in m]


def test_targets_skip_what_a_run_did_not_measure():
    from benchmarks import targets
    row = _row("idd_loss ade20k", compiled=None, fused_next_ms=1.2)  # no compile column; next 20 % slower
    misses = targets.check([row], ("fused", "fused_next"))
    assert len(misses) == 1 and "[IDD_OPS_CUDA_NEXT=1]: time / default kernels 1.20x" in misses[0]
    assert targets.check([_row("idd_loss ade20k", compiled=None, fused_next_ms=1.04)], ("fused", "fused_next")) == []


def test_training_step_targets():
    from benchmarks import targets
    ok = dict(loss="idd", ce_ms=170.0, fused_ms=171.0, reference_ms=180.0)
    assert targets.check_train([ok]) == []
    slow = dict(loss="ifvd", ce_ms=170.0, fused_ms=181.0, reference_ms=179.0, fused_next_ms=172.0)
    misses = targets.check_train([slow], ("fused", "fused_next"))
    assert len(misses) == 2 and all("[default kernels]" in m for m in misses)
    assert any("share of the step 6.1%, target <= 2.0%" in m for m in misses)
    assert any("cost - reference cost (ms) +2.0, target <= +0.5" in m for m in misses)


def test_every_target_names_a_guard_row():
    from benchmarks import targets
    assert set(cases.GUARD_COMPILE) <= set(cases.GUARD)
    for target in targets.OPS:
        assert target.metric in targets.METRICS
        assert target.cases is None or set(target.cases) <= set(cases.GUARD), target
    assert {t.metric for t in targets.TRAIN} <= set(targets.TRAIN_METRICS)
    assert "| issue 21 | idd_loss cityscapes | forward+backward | share of the bound | >= 60% |" in targets.table()


def test_the_guard_measures_each_op_once_before_any_variant():
    """A perf stage stopped at its time limit has then measured every op; the compile column and
    the background compile (same order) follow the guard's order."""
    ops = [name.split()[0] for name in cases.GUARD]
    first = sorted(set(ops), key=ops.index)
    assert ops[:len(first)] == first and len(first) == 7
    assert cases.GUARD_COMPILE == [name for name in cases.GUARD if name in cases.GUARD_COMPILE]


def test_case_names_with_a_batch():
    assert cases._batch("pool2 b2") == 2 and cases._batch("") == 8 and cases._batch("pool2") == 8
    case = cases._make("position_loss 16x32")
    assert case.inputs[0].shape == (8, 5, 16, 32)


def test_merged_kernel_sets_and_their_tables():
    base = [_row("idd_loss cityscapes", fused_host_ms=0.5, fused_launches=40.0, floor_host_ms=0.03), _row("cwd")]
    nxt = [dict(case="idd_loss cityscapes", mode="forward+backward", fused_ms=0.5, fused_host_ms=0.05,
                fused_launches=6.0, copy_gbs=2.0)]
    rows = report.merge_kernel_sets(base, nxt)
    assert rows[0]["fused_next_ms"] == 0.5 and rows[0]["fused_next_launches"] == 6.0 and rows[0]["copy_gbs"] == 1.0
    assert "fused_next_ms" not in rows[1]
    compact = report.compact_table(rows)
    assert "| idd_loss cityscapes | forward+backward | 1.000 | 0.500 | 2.000 | 1.500 | 0.900 | 1.11 | 0.56 | 0.500 | " \
           "40.0 | 0.050 | 6.0 | 0.030 |" in compact
    full = report.table(rows)
    assert "fused next ms" in full and "next vs default" in full and "| 2.00x |" in full and "peak" not in full
    assert "| torch floor host ms/call |" in full and "| 6.0 | 0.030 |" in full
    section = report.summary_section(rows, ["x [IDD_OPS_CUDA_NEXT=1]: y (issue 22 item 6 (guard): z)"],
                                     ["fused", "fused_next"], ["the next kernels' child process failed"])
    assert "- IDD_OPS_CUDA_NEXT=1: 1 guard failures" in section and "- default kernels: 0 guard failures" in section
    assert "ERROR: the next kernels' child process failed" in section and "### Targets missed (1; guard failures: 1)" \
        in section


def test_report_row_without_peaks_with_host_time():
    case = _tiny_idd_case()
    row = report.measure_row(case, True, "cpu", repeat=1, compiled=False, rates=None, probe=common.CopyProbe("cpu"),
                             impls=["fused"], peaks=False, launch_stats=True)
    assert row["fused_ms"] > 0 and row["fused_host_ms"] > 0 and row["fused_launches"] == 0  # no GPU work on a CPU
    assert 0 < row["floor_host_ms"] < row["fused_host_ms"] and row["fused_host_calls"] == []
    assert "reference_ms" not in row and "bound_ms" not in row and "fused_peak" not in row


def test_kernel_times_per_call_and_their_section():
    ev = lambda name, kind, us: types.SimpleNamespace(  # noqa: E731
        name=name, device_type=types.SimpleNamespace(name=kind),
        time_range=types.SimpleNamespace(elapsed_us=lambda: us))
    events = [ev("void idd_ops::(anonymous namespace)::rows_kernel<float, 4>(float const*, int)", "CUDA", 30.0),
              ev("void idd_ops::(anonymous namespace)::rows_kernel<float, 4>(float const*, int)", "CUDA", 30.0),
              ev("Memset (Device)", "CUDA", 3.0), ev("aten::add", "CPU", 100.0)]
    assert kernel_times.per_kernel(events, calls=2) == [("rows_kernel<float, 4>", 1.0, 30.0), ("Memset", 0.5, 1.5)]
    assert kernel_times.label("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                              "std::array<char*, 1> >(int, at::native::FillFunctor<float>, std::array<char*, 1>)") \
        == "vectorized_elementwise_kernel<4, FillFunctor<float>, std::array<char*, 1> >"
    many = [(f"k{i}", 1.0, 10.0 - i) for i in range(8)]
    rows = [dict(case="ifvd", mode="forward+backward", fused_ms=0.1, fused_launches=8.0, fused_kernels=many,
                 fused_next_ms=0.05, fused_next_launches=1.0, fused_next_kernels=[["k", 1.0, 25.0]]),
            dict(case="cwd", mode="forward", fused_ms=0.1)]
    text = kernel_times.section(rows)
    assert "**ifvd, forward+backward, default kernels**: 0.100 ms a call, kernels 0.052 ms (52%), 8.0 launches" in text
    assert "| `k5` | 1.0 | 5.0 |" in text and "| 2 others | 2.0 | 7.0 |" in text and "`k6`" not in text
    assert "**ifvd, forward+backward, next kernels**: 0.050 ms a call, kernels 0.025 ms (50%)" in text
    assert "cwd" not in text and kernel_times.section(rows[1:]) == ""
    assert "Host, runtime calls" not in text


def test_host_calls_per_call_without_the_harness_synchronise():
    ev = lambda name, kind, start, end: types.SimpleNamespace(  # noqa: E731
        name=name, device_type=types.SimpleNamespace(name=kind),
        time_range=types.SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))
    events = [ev("cudaLaunchKernel", "CPU", 0, 4), ev("cudaLaunchKernel", "CPU", 10, 14),
              ev("cudaStreamSynchronize", "CPU", 20, 320), ev("cuLaunchKernelEx", "CPU", 330, 336),
              ev("aten::add", "CPU", 0, 100), ev("cudaLaunchKernel", "CUDA", 0, 50),
              ev(kernel_times.SYNC_LABEL, "CPU", 400, 900), ev("cudaDeviceSynchronize", "CPU", 401, 899),
              ev("cudaDeviceSynchronize", "CPU", 905, 910)]  # the profiler's own, as it stops
    calls = kernel_times.host_calls(events, calls=2)
    assert calls == [("cudaStreamSynchronize", 0.5, 150.0), ("cudaLaunchKernel", 1.0, 4.0),
                     ("cuLaunchKernelEx", 0.5, 3.0)]
    rows = [dict(case="idd_loss", mode="forward+backward", fused_ms=0.5, fused_launches=3.0,
                 fused_kernels=[("k", 3.0, 100.0)], fused_host_calls=calls)]
    assert ("Host, runtime calls per call: 157.0 us in all; `cudaStreamSynchronize` 0.5 x 300.0 us, "
            "`cudaLaunchKernel` 1.0 x 4.0 us, `cuLaunchKernelEx` 0.5 x 6.0 us.") in kernel_times.section(rows)


def test_count_launches_from_device_records_or_runtime_calls():
    ev = lambda name, kind: types.SimpleNamespace(name=name, device_type=types.SimpleNamespace(name=kind))  # noqa: E731
    device = [ev("kernel_a", "CUDA"), ev("Memset", "CUDA"), ev("cudaLaunchKernel", "CPU"), ev("aten::add", "CPU")]
    assert common.count_launches(device) == 2
    assert common.count_launches([ev("cudaLaunchKernel", "CPU"), ev("cuLaunchKernelEx", "CPU"), ev("aten::mm", "CPU")]) == 2


def test_report_kernel_sets_in_child_processes(tmp_path):
    """report --kernels default next on the CPU, tiny case: one child per kernel set, merged
    columns, the targets checked (the 64x128 position loss misses its small-shape target here,
    so the exit status says so) and every output written."""
    out, summary, rows_json = tmp_path / "R.md", tmp_path / "s.md", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--cases", "position_loss 64x128", "--kernels",
                           "default", "next", "--no-peak", "--no-compile", "--repeat", "1", "--targets", "--out",
                           str(out), "--summary", str(summary), "--json", str(rows_json)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert "next kernels (IDD_OPS_CUDA_NEXT=1) in a child process" in proc.stderr
    import json
    rows = json.loads(rows_json.read_text())
    assert [r["mode"] for r in rows] == ["forward", "forward+backward"]
    assert all(r["fused_next_ms"] > 0 and r["reference_ms"] > 0 and r["bound_ms"] > 0 for r in rows)
    assert "Kernels: fused = the default set; fused next = IDD_OPS_CUDA_NEXT=1" in out.read_text()
    misses = [line for line in proc.stdout.splitlines() if line.startswith("MISSED")]
    assert proc.returncode == (1 if misses else 0) and "## perf: key rows" in summary.read_text()


class _TinySegModel(torch.nn.Module):
    """torchvision's segmentation-model layout: backbone(x)["out"] features, classifier head."""

    def __init__(self, channels=16):
        super().__init__()
        self.body = torch.nn.Conv2d(3, channels, 3, stride=8, padding=1)
        self.backbone = lambda x: {"out": torch.relu(self.body(x))}
        self.classifier = torch.nn.Conv2d(channels, train_step.K, 1)


def test_real_network_step_with_a_stand_in_network():
    nets = (_TinySegModel(24).eval().requires_grad_(False), _TinySegModel(16))
    data = train_step.make_real_data(2, size=(64, 128))
    for loss in ("idd", "position", "kd"):
        step, params = train_step.make_real_step(nets, data, loss, reference, amp=torch.bfloat16)
        before = [p.detach().clone() for p in params]
        step()
        assert all(p.grad is not None for p in params), loss
        assert any(not torch.equal(a, p) for a, p in zip(before, params)), loss
    row = train_step.measure_loss("idd", data, "cpu", 1, impls=("ce", "fused"), peaks=False, nets=nets,
                                  amp=torch.bfloat16)
    assert set(row) == {"loss", "ce_ms", "fused_ms"}
    assert not train_step.real_network_available("cpu")


def test_train_step_next_kernels_merge_and_table():
    base = [dict(loss="idd", ce_ms=100.0, fused_ms=103.0, reference_ms=110.0)]
    rows = train_step.merge_kernel_sets(base, [dict(loss="idd", ce_ms=102.0, fused_ms=103.5)])
    assert rows[0]["fused_next_ms"] == pytest.approx(101.5)  # moved by the CE-only steps' difference
    text = train_step.table(rows)
    assert "| idd | 100 | 103 | 102 | 110 | 1.07x | 3.0 | 1.5 | 10.0 | 2.9% | 1.5% | 9.1% |" in text


CHILD = """import json, os, sys, time
path = sys.argv[-1]
rows = []
for i in range(3):
    rows.append(dict(row=i, next=os.environ["IDD_OPS_CUDA_NEXT"]))
    json.dump(dict(rows=rows), open(path, "w"))
    if os.environ["IDD_OPS_CUDA_NEXT"] == "1":
        time.sleep(60)  # stopped at its time limit after one row
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("status", [0, 3])
def test_kernel_set_children_keep_the_rows_they_finished(tmp_path, monkeypatch, status):
    (tmp_path / "fake_child.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    results, errors = common.run_per_kernel_set("fake_child", lambda ks, path: [str(status), path],
                                                ["default", "next"], time_limit=5)
    assert [r["next"] for r in results["default"]["rows"]] == ["0", "0", "0"]
    assert [r["next"] for r in results["next"]["rows"]] == ["1"]
    assert "the next kernels' child process reached its time limit" in errors[-1] and "after 1 rows" in errors[-1]
    assert len(errors) == (2 if status else 1)
    if status:
        assert "the default kernels' child process failed (exit status 3) after 3 rows" in errors[0]


def test_report_keeps_going_past_a_failing_case(monkeypatch):
    def broken_compile(call):
        def run(*inputs):
            raise RuntimeError("inductor fell over")
        return run
    monkeypatch.setattr(cases, "compile_reference", broken_compile)
    errors = []
    rows, _ = report.measure(["position_loss 8x16", "no such case"], "cpu", 1, True, peaks=False, errors=errors)
    assert [(r["case"], r["mode"]) for r in rows] == [("position_loss 8x16", "forward"),
                                                       ("position_loss 8x16", "forward+backward")]
    assert all("compiled_ms" not in r and r["reference_ms"] > 0 for r in rows)  # measured again without compile
    assert errors[0].startswith("position_loss 8x16 (with torch.compile): RuntimeError: inductor fell over")
    assert errors[1].startswith("no such case: ValueError: unknown benchmark case 'no such case': expected ")
    with pytest.raises(ValueError, match="unknown benchmark case"):
        report.measure(["no such case"], "cpu", 1, False, peaks=False)


@pytest.mark.parametrize("argv", [["--cases", "foo"], ["--cases", "ifvd b2x"], ["--skip", "skd pool 1"],
                                  ["--cases", "idd_loss cityscapes fragmentd"], ["--repeat", "0"], ["--device", "foo"],
                                  ["--out", "."], ["--update", "--cases", "ifvd"],
                                  ["--cases", "position_loss 8x16", "--skip", "position_loss 8x16"],
                                  ["--time-limit", "-5"]])
def test_report_options_fail_before_anything_runs(monkeypatch, capsys, argv):
    monkeypatch.setattr(report, "measure", lambda *a, **k: pytest.fail("measured despite a bad option"))
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_every_listed_case_name_is_accepted():
    for name in {*cases.CUDA_FULL, *cases.QUICK, *cases.GUARD, "skd pool2 b2", "idd_loss voc fragmented channels_last"}:
        cases.check_name(name)


def test_report_writes_the_cases_that_ran_and_a_command_that_reruns(tmp_path, monkeypatch):
    """A case that fails late costs its own row only: the others are written, the exit says why,
    and the recorded command keeps the quotes of names with spaces."""
    built = cases._position

    def position(size):
        if size == (4, 8):
            raise RuntimeError("out of memory")
        return built(size)
    monkeypatch.setattr(cases, "_position", position)
    out = tmp_path / "r.md"
    argv = ["--cases", "position_loss 8x16", "position_loss 4x8", "--no-compile", "--no-peak", "--repeat", "1",
            "--out", str(out), "--json", str(tmp_path / "new" / "rows.json")]  # a folder made when written
    with pytest.raises(SystemExit, match="1 errors"):
        report.main(argv)
    text = out.read_text()
    assert "| position_loss | B=8 M=5 8x16 |" in text and "4x8" not in text.split("\n\n", 1)[1]
    assert "--cases 'position_loss 8x16' 'position_loss 4x8'" in text.splitlines()[0]
    assert (tmp_path / "new" / "rows.json").exists()


def test_small_times_keep_three_significant_figures():
    assert [report._ms_cell({"t": v}, "t") for v in (0.0312, 1.234, 12.34, 0, float("nan"))] == \
        ["0.0312", "1.23", "12.3", "0.0", "nan"]


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--repeat", "-1"], ["--device", "cuda:7"],
                                  ["--network", "deeplabv3"], ["--losses", "idd", "--skip", "idd"],
                                  ["--update", "--losses", "idd"], ["--out", "."]])
def test_train_step_options_fail_before_anything_runs(monkeypatch, capsys, argv):
    monkeypatch.setattr(train_step, "measure", lambda *a, **k: pytest.fail("measured despite a bad option"))
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_sweep_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--repeat", "0"])
    assert exit_info.value.code == 2


def test_sweep_out_must_be_a_folder_it_can_make(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", os.path.join(__file__, "sub")])
    assert exit_info.value.code == 2 and "--out: cannot create the folder" in capsys.readouterr().err
