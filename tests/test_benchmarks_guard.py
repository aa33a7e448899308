"""The benchmarks' GPU guard (tools/gpu_check.sh's perf and train stages): the targets of
benchmarks/targets.py, the kernel-set columns and the child processes that time each set, the
per-kernel times and host calls, and the training step's real-network path. Small inputs, no
timings asserted."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside tests/, off the path under plain `pytest`

from benchmarks import cases, common, kernel_predictions, kernel_times, report, report_tables, train_step  # noqa: E402
from idd_ops import reference  # noqa: E402
from test_benchmarks import _tiny_idd_case  # noqa: E402


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
    rows = report_tables.merge_kernel_sets(base, nxt)
    assert rows[0]["fused_next_ms"] == 0.5 and rows[0]["fused_next_launches"] == 6.0 and rows[0]["copy_gbs"] == 1.0
    assert "fused_next_ms" not in rows[1]
    compact = report_tables.compact_table(rows)
    assert "| idd_loss cityscapes | forward+backward | 1.000 | 0.500 | 2.000 | 1.500 | 0.900 | 1.11 | 0.56 | 0.500 | " \
           "40.0 | 0.050 | 6.0 | 0.030 |" in compact
    full = report_tables.table(rows)
    assert "fused next ms" in full and "next vs default" in full and "| 2.00x |" in full and "peak" not in full
    assert "| torch floor host ms/call |" in full and "| 6.0 | 0.030 |" in full
    section = report_tables.summary_section(rows, ["x [IDD_OPS_CUDA_NEXT=1]: y (issue 22 item 6 (guard): z)"],
                                     ["fused", "fused_next"], ["the next kernels' child process failed"])
    assert "- IDD_OPS_CUDA_NEXT=1: 1 guard failures" in section and "- default kernels: 0 guard failures" in section
    assert "ERROR: the next kernels' child process failed" in section and "### Targets missed (1; guard failures: 1)" \
        in section


def test_graph_replay_column_and_target():
    """The small shapes' forward+backward replayed from a CUDA graph: a column of both tables (of
    each kernel set) and a target of its own beside the eager one; rows without it keep neither."""
    from benchmarks import targets
    rows = [_row("cwd b2", fused=0.4, reference=1.0, compiled=0.5, bound=0.01, fused_host_ms=0.4, fused_launches=2.0,
                 floor_host_ms=0.2, fused_graph_ms=0.05, fused_next_ms=0.3, fused_next_graph_ms=0.12)]
    compact = report_tables.compact_table(rows)
    assert compact.splitlines()[0].endswith("| torch floor host ms/call | graph ms | next graph ms |")
    assert compact.splitlines()[2].endswith("| 0.200 | 0.050 | 0.120 |")
    assert "| fused graph ms | next graph ms |" in report_tables.table(rows)
    misses = targets.check(rows, ("fused", "fused_next"))
    captured = [m for m in misses if "graph replay" in m]
    assert captured == ["cwd b2 forward+backward [IDD_OPS_CUDA_NEXT=1]: graph replay / max(2x bound, 0.1 ms) 1.20, "
                        "target <= 1.00 (issue 22 item 4, captured: the same replayed from a CUDA graph (docs/API.md's "
                        "way past the host's cost at small shapes))"]
    assert len([m for m in misses if "time / max(2x bound" in m]) == 2  # eager: 0.4 and 0.3 ms
    plain = [_row("cwd b2", bound=0.01, fused_host_ms=0.4, fused_launches=2.0, floor_host_ms=0.2)]
    assert "graph" not in report_tables.compact_table(plain) + report_tables.table(plain)
    assert not [m for m in targets.check(plain) if "graph replay" in m]
    assert common.graph_ms(lambda: None, "cpu") is None  # CUDA only


def test_report_row_without_peaks_with_host_time():
    case = _tiny_idd_case()
    row = report.measure_row(case, True, "cpu", repeat=1, compiled=False, rates=None, probe=common.CopyProbe("cpu"),
                             impls=["fused"], peaks=False, launch_stats=True, graph_stats=True)
    assert row["fused_ms"] > 0 and row["fused_host_ms"] > 0 and row["fused_launches"] == 0  # no GPU work on a CPU
    assert row["fused_graph_ms"] is None  # CUDA graphs: CUDA only
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


def test_kernel_predictions_beside_the_measured_times():
    """The next set's kernels stand beside their predictions (the default set's, unpredicted,
    keep three columns); a predicted kernel past the TOP longest is still listed; a kernel over
    MISS times its prediction, and a prediction whose kernel did not run, are named as misses
    in the section and the GPU check's summary."""
    gemms = [(f"gemm{i}", 1.0, 500.0 - i) for i in range(6)]
    rows = [dict(case="skd pool2", mode="forward+backward", fused_ms=3.2, fused_launches=34.0,
                 fused_kernels=[("affinity_cuda::pivot_kernel<1>", 4.0, 675.1)],
                 fused_next_ms=2.0, fused_next_launches=34.0,
                 fused_next_kernels=gemms + [("affinity_cuda::pooled_sums_kernel<float, 2>", 4.0, 480.0),
                                             ("affinity_cuda::centred_kernel<float, 4>", 4.0, 100.0),
                                             ("affinity_cuda::pivot_kernel<16>", 4.0, 84.0),
                                             ("affinity_cuda::gram_tail_means_kernel<float>", 2.0, 18.0),
                                             ("affinity_cuda::operands_u_kernel<float, float>", 2.0, 15.0),
                                             ("other", 1.0, 1.0)]),
            dict(case="cwd", mode="forward+backward", fused_ms=0.5, fused_kernels=[("kl_rows_forward", 1.0, 88.0)])]
    text = kernel_times.section(rows)
    assert "| `affinity_cuda::pivot_kernel<1>` | 4.0 | 675.1 |\n" in text
    assert "| `gemm0` | 1.0 | 500.0 | - |" in text and "| 1 others | 1.0 | 1.0 | |" in text
    assert "| `affinity_cuda::pivot_kernel<16>` | 4.0 | 84.0 | 80 (1.1x) |" in text  # the 9th longest
    assert "| `affinity_cuda::centred_kernel<float, 4>` | 4.0 | 100.0 | 120 (0.8x) |" in text
    misses = kernel_predictions.misses(rows)
    assert len(misses) == 2 and "`affinity_cuda::pooled_sums_kernel<float, 2>` took 480.0 us a call, 2.0x" in misses[0]
    assert "no kernel matching `affinity_cuda::affinity_gradient_kernel<float(, 3)?>` ran (next kernels)" in misses[1]
    assert "Predictions missed" in text and all(m in text for m in misses)
    summary = report_tables.summary_section(rows, [], ())
    assert "### Kernel predictions missed (2;" in summary and "Targets missed" not in summary
    # after the switch-on the next set is the default and its kernels lose the template argument
    switched = [dict(case="skd pool2", mode="forward+backward", fused_ms=2.0, fused_launches=34.0,
                     fused_kernels=[("affinity_cuda::pivot_kernel", 4.0, 90.0),
                                    ("affinity_cuda::pooled_sums_kernel<float>", 4.0, 200.0),
                                    ("affinity_cuda::centred_kernel<float>", 4.0, 110.0),
                                    ("affinity_cuda::affinity_gradient_kernel<float>", 2.0, 150.0),
                                    ("affinity_cuda::gram_tail_means_kernel<float>", 2.0, 18.0),
                                    ("affinity_cuda::operands_u_kernel<float, float>", 2.0, 15.0)])]
    assert kernel_predictions.misses(switched) == []
    assert "| `affinity_cuda::pivot_kernel` | 4.0 | 90.0 | 80 (1.1x) |" in kernel_times.section(switched)


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


def test_the_next_set_is_the_groups_gpu_check_names():
    """IDD_OPS_NEXT_SET (tools/gpu_check.sh: some of the next set's groups) is the value the next
    set's children run with, and what the report's and the training step's headers name."""
    code = ("from benchmarks import common, report_tables, targets; print(common.KERNEL_SETS['next']); "
            "print(report_tables.kernels_note(['default', 'next'])); print(targets._label('fused_next'))")
    env = dict(os.environ, IDD_OPS_NEXT_SET="all,-skd")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True, env=env).stdout.splitlines()
    assert out[0] == "all,-skd"
    assert "fused next = IDD_OPS_CUDA_NEXT=all,-skd" in out[1] and out[-1] == "IDD_OPS_CUDA_NEXT=all,-skd"


def test_one_kernel_set_has_the_whole_time_limit(monkeypatch):
    """--kernels default alone (tools/gpu_check.sh's default): the child gets the stage's whole
    time limit, not the first set's share of two."""
    timeouts = []
    monkeypatch.setattr(common.subprocess, "run",
                        lambda *args, timeout=None, **kw: timeouts.append(timeout) or types.SimpleNamespace(returncode=0))
    _, errors = common.run_per_kernel_set("fake_child", lambda ks, path: [path], ["default"], time_limit=30,
                                          weights=[2, 1])
    assert len(timeouts) == 1 and 29 < timeouts[0] <= 30
    assert errors == []
