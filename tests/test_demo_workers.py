"""Runs on a pool of worker processes: the same results as one run after the other, the pool's
threads, and how a run with workers ends on a signal or when its parent is killed."""
import json
import os
import sys

import pytest
import torch

from idd_ops.demo import experiment
from idd_ops.demo.scenes import StreetScenes

from demo_setup import REPOSITORY, tiny_preset


def test_worker_processes_give_the_runs_of_one_by_one(tmp_path):
    """Two single-threaded worker processes and one run after the other in this process, both
    with one thread per run (this process keeps its own setting for the rest, the teacher's
    training included): the same teacher, the same runs bit for bit, ce+idd and ce+kd included,
    which read the teacher's tables; each worker wrote its cache piece, which a rerun takes.
    Before the tables and the one-worker runs took this process's threads, --workers 1 and 2
    gave different numbers on 2 cores."""
    preset = tiny_preset(seeds=(0, 1), student_steps=3, configs=("ce", "ce+idd", "ce+kd"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    a = experiment.run_experiment(preset, one, "cpu", workers=1, threads=1)
    b = experiment.run_experiment(preset, two, "cpu", workers=2, threads=1)
    assert a[0]["threads_per_worker"] == b[0]["threads_per_worker"] == 1
    assert b[0]["workers"] == 2 and a[0]["workers"] == 1
    assert a[0]["teacher_id"] == b[0]["teacher_id"]
    assert set(a[2]) == set(b[2]) == {(c, s) for c in preset.configs for s in preset.seeds}
    for piece, run in a[2].items():
        other = b[2][piece]
        for name in ("miou", "iou", "curves", "distance_gap", "position_error", "weights"):
            assert json.dumps(run[name]) == json.dumps(other[name]), (piece, name)  # exact floats, NaN too
        for name, t in run["model"].items():
            assert torch.equal(t, other["model"][name]), (piece, name)
    assert len(list((tmp_path / "two" / "runs").glob("*.pt"))) == 6
    again = experiment.run_experiment(preset, two, "cpu", workers=2, threads=1)[0]
    assert sorted(again["cached"]) == sorted(["teacher"] + [f"{c}|{s}" for c, s in a[2]])
    # the wall time counts a cached run's seconds over the runs that trained beside it
    assert {r["side_by_side"] for r in a[2].values()} == {1} and {r["side_by_side"] for r in b[2].values()} == {2}
    teacher_seconds = torch.load(tmp_path / "two" / "teacher.pt", weights_only=False)["seconds"]
    runs_seconds = sum(r["seconds"] for r in b[2].values()) / 2
    assert again["seconds"] - again["seconds_this_call"] == pytest.approx(teacher_seconds + runs_seconds)
    # on the CPU a run's thread count is part of its key: another count trains again
    other = experiment.run_experiment(tiny_preset(seeds=(0,), student_steps=3, configs=("ce",)), two, "cpu", workers=1,
                                      threads=2)[0]
    assert other["cached"] == ["teacher"]
    # a teacher given from elsewhere says so where the wall time counts it
    given = experiment.run_experiment(tiny_preset(seeds=(0,), configs=("ce",)), str(tmp_path / "three"), "cpu", workers=1,
                                      teacher_checkpoint=str(tmp_path / "two" / "teacher.pt"))[0]
    assert given["cached"] == [f"teacher (--teacher {tmp_path / 'two' / 'teacher.pt'})"]


def test_pieces_and_tables_compute_on_the_pools_threads(monkeypatch):
    """One worker runs its pieces in this process on the pool's threads, and restores them."""
    from idd_ops.demo.workers import Workers

    seen = []
    before = torch.get_num_threads()
    with Workers("cpu", workers=1, threads=1) as pool:
        list(pool.map(lambda: seen.append(torch.get_num_threads()), [(), ()]))
        with pool.piece_threads():
            seen.append(torch.get_num_threads())
    assert seen == [1, 1, 1] and torch.get_num_threads() == before


def test_scenes_rendered_in_workers_are_the_same_scenes():
    from idd_ops.demo.workers import Workers

    one = StreetScenes(7, seed=4, size=(32, 64))
    with Workers("cpu", workers=2, threads=1) as pool:
        two = StreetScenes(7, seed=4, size=(32, 64), map=pool.map, chunk=3)
        assert pool.pool is not None  # three chunks went to the workers
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)


def test_worker_plan_divides_the_cores():
    from idd_ops.demo import workers

    cores = workers.cpu_cores()
    assert workers.plan("cpu", workers=1) == (1, cores)
    assert workers.plan("cpu", workers=2, threads=1) == (2, 1)
    assert workers.plan("cpu", workers=2 * cores)[1] == 1
    n, threads = workers.plan("cpu")
    assert n >= 1 and n * threads <= max(cores, n)
    with pytest.raises(ValueError, match="workers"):
        workers.plan("cpu", workers=0)


def test_an_interrupted_run_ends_with_one_line_and_the_signals_status(tmp_path, capsys):
    """Ctrl-C (130) and a time limit's SIGTERM (143) end a run with one line on how to resume:
    SIGTERM killed the process before, leaving the shared run file in runs/, and the tuning
    printed a traceback for Ctrl-C."""
    import signal
    import time

    from idd_ops.demo import cli

    before = signal.getsignal(signal.SIGTERM)
    for stop, code in (("SIGTERM", 143), ("Ctrl-C", 130)):
        with pytest.raises(SystemExit) as ended:
            with cli.resumable(str(tmp_path)):
                if stop == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(10)  # the handler raises here, at once
                raise KeyboardInterrupt
        assert ended.value.code == code
        assert "the same command resumes" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is before


STOPPED_WITH_WORKERS = """
import signal, sys, time
from idd_ops.demo.cli import resumable
from idd_ops.demo.workers import Workers

if __name__ == "__main__":
    # as in a terminal: a shell's background job (CI, nohup) starts with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with resumable(sys.argv[1]), Workers("cpu", workers=2, threads=1) as pool:
        print(list(pool.map(abs, [(-1,), (-2,)])), flush=True)
        if sys.argv[2] == "busy":
            list(pool.map(time.sleep, [(60,), (60,)]))
        time.sleep(60)  # idle workers, as while the teacher trains
"""


def _start_script(tmp_path, source, *args, **popen_options):
    """A child Python running the script `source` with `args`, importing idd_ops from this checkout."""
    import subprocess

    script = tmp_path / "run.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, **popen_options)


@pytest.mark.parametrize("workers", ["idle", "busy"])
@pytest.mark.parametrize("stop, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_whole_group_stops_a_run_with_workers(tmp_path, stop, code, workers):
    """`timeout` and a terminal's Ctrl-C signal the whole process group. An idle worker killed by
    SIGTERM died holding the pool's queue lock, and the run hung in Pool.terminate() until
    SIGKILL; the workers now have a session of their own and the parent stops them."""
    import signal
    import subprocess
    import time

    proc = _start_script(tmp_path, STOPPED_WITH_WORKERS, tmp_path, workers, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "[1, 2]\n"
        time.sleep(1)  # the workers back in the queue's get (idle) or inside time.sleep (busy)
        os.killpg(proc.pid, getattr(signal, stop))
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code and "the same command resumes" in err


KILLED_WITH_BUSY_WORKERS = """
import os, sys, time
from idd_ops.demo.workers import Workers


def mark_and_sleep(folder):
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(60)


if __name__ == "__main__":
    with Workers("cpu", workers=2, threads=1) as pool:
        list(pool.map(mark_and_sleep, [(sys.argv[1],), (sys.argv[1],)]))
"""


def _wait_until(condition, seconds):
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_busy_workers_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL to the parent leaves it no time to stop its pool: a busy worker went on with its
    run (minutes on a CPU) for nobody. The workers ask the kernel for SIGTERM at their parent's
    death."""
    import signal

    marks = tmp_path / "pids"
    marks.mkdir()
    proc = _start_script(tmp_path, KILLED_WITH_BUSY_WORKERS, marks)
    try:
        _wait_until(lambda: len(list(marks.iterdir())) >= 2 or proc.poll() is not None, 60)
        pids = [int(p.name) for p in marks.iterdir()]
        assert len(pids) == 2, "the workers did not start"
        proc.kill()
        proc.wait()
        _wait_until(lambda: not any(map(_running, pids)), 10)
        assert not any(map(_running, pids))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in [int(p.name) for p in marks.iterdir()]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
