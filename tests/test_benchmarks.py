"""The benchmark machinery itself: roofline bounds, the profiler's peak memory, the memory check,
label generators, the report's rows and options and the training-step script (the GPU guard's
parts: test_benchmarks_guard.py). Small inputs, no timings asserted."""
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

from benchmarks import cases, common, peak, report, report_tables, roofline, sweep, train_step  # noqa: E402
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
    text = report_tables.table([row, dict(row, fused_peak=0)])
    assert "not installed" in text and "| memory |" in text
    assert text.count(" ! |") == 1  # the impossible fused entry of the second row
    head = report_tables.header("cpu", 1, False, _FixedRates(), [row], "results/x/RESULTS.md")
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
    assert [report_tables._ms_cell({"t": v}, "t") for v in (0.0312, 1.234, 12.34, 0, float("nan"))] == \
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
