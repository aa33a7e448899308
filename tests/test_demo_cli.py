"""The demo's command line: bad flags and files refused before any work, what it needs
installed, and progress in a log."""
import os
import sys

import pytest
import torch

from idd_ops.demo.models import make_teacher
from idd_ops.demo.scenes import CLASSES

from demo_setup import REPOSITORY


def test_setup_without_torch_stops_with_instructions():
    import subprocess

    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; exec(open('setup.py').read())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation" in proc.stderr and "download.pytorch.org/whl/cpu" in proc.stderr


@pytest.mark.parametrize("argv,text", [
    (["--teacher", "/nonexistent/teacher.pt"], "--teacher: no file"),
    (["--weight", "idd=abc"], "--weight: expected LOSS=VALUE"),
    (["--weight", "idd=-1"], "finite weights >= 0"),
    (["--weight", "idd=nan"], "finite weights >= 0"),
    (["--student-steps", "0"], "--student-steps: expected an int >= 1"),
    (["--teacher-steps", "-5"], "--teacher-steps: expected an int >= 1"),
    (["--workers", "0"], "--workers: expected an int >= 1"),
    (["--device", "foo"], "--device: expected cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device: expected cpu, cuda or cuda:N"),
    (["--seeds", "18446744073709551615"], "expected a seed in [0, 2**63)"),
    (["--seeds", "0", "0"], "--seeds: 0 0 names one twice"),
    (["--configs", "ce", "ce+idd", "ce"], "--configs: ce ce+idd ce names one twice"),
    (["--threads", "0"], "--threads: expected an int >= 1"),
    (["--configs", "ce", "ce+idd", "--weight", "cwd=5"], "--weight: no configuration of this run uses cwd"),
    (["--out", __file__], "is a file; expected a folder"),
    (["--out", os.path.join(__file__, "sub")], "--out: cannot create the folder"),
    (["--replot", "/nonexistent"], "--replot: '/nonexistent' holds no results.json"),
    (["--replot", "results/cpu", "--preset", "full", "--seeds", "3"], "it takes no run options (got --preset --seeds)"),
])
def test_the_cli_rejects_bad_flags_before_any_work(argv, text, capsys):
    """Each mistake ends in an argparse error naming the flag (exit status 2), before scenes are
    generated or a teacher trained: a mistyped --teacher once trained a new teacher and saved it
    at the mistyped path, and --student-steps 0 was silently ignored."""
    from idd_ops.demo import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert text in capsys.readouterr().err


@pytest.mark.parametrize("content, text", [(b"{}", "not a checkpoint torch can read"),
                                           ({"model": {}, "curve": [], "miou": 0.5}, "not a teacher checkpoint"),
                                           ({"model": {"w": torch.zeros(2)}, "curve": []}, "do not fit the teacher")])
def test_the_cli_refuses_a_teacher_file_that_is_not_one(tmp_path, capsys, content, text):
    """A results.json or a student's run given as --teacher: an argparse error, not a traceback
    from torch.load or load_state_dict."""
    from idd_ops.demo import cli

    path = tmp_path / "teacher.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--teacher", str(path)])
    assert stop.value.code == 2 and text in capsys.readouterr().err


@pytest.mark.parametrize("main", ["cli", "tune"])
def test_a_teacher_of_another_image_size_is_refused(tmp_path, capsys, main):
    """A 64x128 teacher given to the full preset (128x256) was taken, and the results described
    the preset's teacher instead."""
    from idd_ops.demo import cli, tune

    path = tmp_path / "teacher.pt"
    torch.save({"model": make_teacher(len(CLASSES)).state_dict(), "curve": [],
                "key": {"size": [8, 16]}}, path)
    with pytest.raises(SystemExit) as stop:
        {"cli": cli, "tune": tune}[main].main(["--preset", "full", "--teacher", str(path)])
    assert stop.value.code == 2
    assert "was trained on 8x16 images; the full preset's are 128x256" in capsys.readouterr().err


def test_replot_and_weight_options_that_would_do_something_else_are_errors(capsys):
    from idd_ops.demo import cli

    for argv, message in ((["--replot", ""], "--replot: '' holds no results.json"),
                          (["--weight", "idd=0.3", "--weight", "idd=3"], "--weight: idd is given twice")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as where it is not installed."""
    import builtins

    real_import = builtins.__import__

    def hidden(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", hidden)


def test_the_cli_needs_matplotlib_before_any_work(no_matplotlib, monkeypatch, capsys, tmp_path):
    """Without matplotlib the run would train for minutes and fail at its plots; a bad flag is
    still named first (the tests of bad flags pass where matplotlib is not installed)."""
    from idd_ops.demo import cli

    monkeypatch.setattr(cli, "run_experiment", lambda *a, **k: pytest.fail("ran without matplotlib"))
    out = ["--out", str(tmp_path / "out")]
    for argv, text in ((out, "idd-distill draws its plots with matplotlib, which is not installed: pip install "
                             "matplotlib"),
                       (["--replot", "results/cpu"], "idd-distill --replot draws its plots with matplotlib"),
                       (out + ["--weight", "idd=abc"], "--weight: expected LOSS=VALUE")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2 and text in capsys.readouterr().err


def test_the_sweep_needs_matplotlib_after_its_flags(no_matplotlib, capsys, tmp_path):
    from benchmarks import sweep

    for argv, text in ((["--out", str(tmp_path / "out")], "benchmarks.sweep draws its plots with matplotlib"),
                       (["--out", os.path.join(__file__, "sub")], "--out: cannot create the folder")):
        with pytest.raises(SystemExit) as stop:
            sweep.main(argv)
        assert stop.value.code == 2 and text in capsys.readouterr().err


def test_progress_prints_plain_lines_when_not_on_a_terminal():
    import io

    from idd_ops.demo.progress import Progress

    log = io.StringIO()
    bar = Progress(1000, "train", stream=log)
    for _ in range(1000):
        bar.update(loss=0.5)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("train: 100/1000 (10 %)") and lines[-1].startswith("train: 1000/1000 (100 %)")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = Progress(5, "train", stream=screen, every=0)
    for _ in range(5):
        bar.update()
    assert screen.getvalue().count("\r") == 5 and screen.getvalue().endswith("\n")

    class Loss:  # a GPU loss: reading it makes the host wait, so only a written line may
        reads = 0

        def item(self):
            Loss.reads += 1
            return 0.25

    log = io.StringIO()
    bar = Progress(100, "train", stream=log)
    for _ in range(100):
        bar.update(loss=Loss())
    assert Loss.reads == 10 and log.getvalue().splitlines()[-1].endswith("loss 0.25")
