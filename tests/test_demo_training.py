"""Training the demo's teacher and students: one step of every configuration, the timed
steps, and the cache of finished pieces (keys, resuming, whole writes, the teacher's outputs)."""
import os

import pytest
import torch

from idd_ops.demo import experiment, presets
from idd_ops.demo.models import FEATURE_LAYER, make_teacher
from idd_ops.demo.scenes import CLASSES, StreetScenes

from demo_setup import small_setup, tiny_preset


@pytest.mark.parametrize("config", list(presets.CONFIGS))
def test_one_training_step_per_configuration(config):
    preset, train, teacher, readout = small_setup()
    student, curves, _ = experiment.train_student(preset, config, 0, train, teacher, readout, "cpu", steps=1)
    assert set(curves) == {"ce", *presets.CONFIGS[config]}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in curves.values())


def test_progress_lines_name_the_weights_a_run_overrides(capsys):
    # the tuning trains one configuration at several weights: its progress lines must tell them apart
    assert presets.run_label("ce+idd", 100, {}) == "ce+idd seed 100"
    assert presets.run_label("ce+idd", 100, {"idd": 3.0, "cwd": 30.0}) == "ce+idd seed 100, idd weight 3"
    assert presets.run_label("ce+kd+idd+pid", 0, {"pid": 0.3, "idd": 1.0}) == \
        "ce+kd+idd+pid seed 0, pid weight 0.3, idd weight 1"
    preset, train, teacher, readout = small_setup(weights={"idd": 0.3})
    experiment.train_student(preset, "ce+idd", 7, train, teacher, readout, "cpu", steps=1)
    assert "ce+idd seed 7, idd weight 0.3: 1/1" in capsys.readouterr().err


def test_step_time_takes_the_median_of_alternating_rounds(tmp_path):
    from idd_ops.demo.report import write_markdown

    preset, train, teacher, readout = small_setup()
    st = experiment.step_time(preset, "ce+kd+idd+pid", train, teacher, readout, "cpu", steps=1, warmup=1, rounds=3)
    for name in ("fused", "reference"):
        assert len(st["rounds"][name]) == 3 and min(st["rounds"][name]) > 0
        assert st[name] == sorted(st["rounds"][name])[1]
    results = experiment.run_experiment(tiny_preset(smoke=True), str(tmp_path), "cpu", workers=1)[0]
    text = write_markdown(dict(results, step_time=st), str(tmp_path))
    assert "median of 3 alternating rounds of 1 steps each, after 1 untimed steps of both" in text


def test_cache_key_holds_every_setting():
    preset = tiny_preset()
    key = experiment.run_key(preset, "ce+pid", 0, "t1", "cpu")
    assert key == experiment.run_key(tiny_preset(), "ce+pid", 0, "t1", "cpu")
    changed = [experiment.run_key(tiny_preset(student_steps=2), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(tiny_preset(size=(64, 128)), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(tiny_preset(weights={"pid": 0.3}), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(tiny_preset(lr=1e-3), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(preset, "ce+pid", 1, "t1", "cpu"),
               experiment.run_key(preset, "ce", 0, "t1", "cpu"),
               experiment.run_key(preset, "ce+pid", 0, "t2", "cpu")]
    assert all(k != key for k in changed)
    # a weight override of a loss the configuration does not use changes nothing
    assert experiment.run_key(tiny_preset(weights={"idd": 3.0}), "ce+pid", 0, "t1", "cpu") == key
    assert experiment.teacher_key(tiny_preset(teacher_steps=2), "cpu") != experiment.teacher_key(preset, "cpu")


def test_the_teacher_key_holds_the_cpu_threads_it_trains_on():
    """A CPU teacher trained on other threads is another teacher (a cached one was reused whatever
    the thread count); on CUDA the threads change nothing."""
    preset, threads = tiny_preset(), torch.get_num_threads()
    keys = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            keys[n] = (experiment.teacher_key(preset, "cpu"), experiment.teacher_key(preset, "cuda"))
    finally:
        torch.set_num_threads(threads)
    assert keys[1][0] != keys[2][0] and keys[1][1] == keys[2][1]


def test_experiment_caches_announces_and_reruns_changed_settings(tmp_path, capsys, one_thread):
    from idd_ops.demo.plots import write_plots
    from idd_ops.demo.report import write_markdown

    out = str(tmp_path)
    results, teacher, runs, val = experiment.run_experiment(tiny_preset(), out, "cpu", command="test")
    assert results["cached"] == [] and results["seconds"] == results["seconds_this_call"]
    assert all("position_error" in r for r in results["runs"].values())  # every configuration probed
    capsys.readouterr()
    again = experiment.run_experiment(tiny_preset(), out, "cpu")[0]
    err = capsys.readouterr().err
    assert "cache: using" in err and again["cached"] == ["teacher", "ce|0", "ce+pid|0"]
    assert again["runs"]["ce|0"]["miou"] == results["runs"]["ce|0"]["miou"]
    assert again["seconds"] > again["seconds_this_call"]  # cached pieces count with the time they took
    changed = experiment.run_experiment(tiny_preset(student_steps=2), out, "cpu")[0]
    assert changed["cached"] == ["teacher"]
    assert "the pieces of ce seed 0 in" in capsys.readouterr().err  # said why it trains again
    assert len(changed["runs"]["ce|0"]["curves"]["ce"]) == 2
    text = write_markdown(again, out)
    assert "cached from earlier calls" in text and "not measured" not in text
    assert "vs ce: paired difference" in text and "Per-class IoU: paired difference to ce" in text
    pytest.importorskip("matplotlib")
    write_plots(changed, teacher, runs, val, out, "cpu")
    for name in ("paired.png", "miou.png", "loss_curves.png", "predictions.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_cache_piece_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run stopped while it saves (a time limit's signal) leaves no truncated piece at the cache's
    path for the next call to fail on; the piece is there once the save has finished."""
    path = tmp_path / "teacher.pt"
    experiment.save_piece({"key": "a"}, str(path))
    assert torch.load(path)["key"] == "a"
    real_save = torch.save

    def stopped_midway(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as handle:  # a truncated file, as a kill during the write leaves
            handle.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        experiment.save_piece({"key": "b"}, str(path))
    assert torch.load(path)["key"] == "a"
    assert os.listdir(tmp_path) == ["teacher.pt"]


def test_cached_teacher_gives_the_teachers_outputs():
    """Looked up by index, the cached logits and (hooked) features equal a forward pass."""
    from idd_ops.demo.teacher_cache import CachedTeacher
    from idd_ops.distiller import FeatureHook

    data = StreetScenes(5, seed=1, size=(32, 64))
    teacher = make_teacher(len(CLASSES)).eval()
    cached = CachedTeacher.compute(teacher, data, FEATURE_LAYER, 2, "cpu")
    idx = torch.tensor([4, 1, 1])
    x = data.images[idx].float() / 255
    hook, cached_hook = FeatureHook(teacher, FEATURE_LAYER), FeatureHook(cached, FEATURE_LAYER)
    with torch.no_grad():
        want = teacher(x)
    cached.select(idx)
    got = cached(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached_hook.pop(), hook.pop(), rtol=1e-4, atol=1e-5)


def test_a_cached_teacher_of_another_network_is_trained_again(tmp_path, capsys, one_thread):
    """A teacher.pt in the output folder whose weights no longer fit (an older version's
    network) is a stale cache piece: trained again, not a traceback. Given as --teacher it is
    an error (test_the_cli_refuses_a_teacher_file_that_is_not_one)."""
    torch.save({"model": {"w": torch.zeros(2)}, "curve": [], "key": {}}, tmp_path / "teacher.pt")
    preset = tiny_preset()
    data = experiment.make_data(preset)
    teacher, _, _, cached = experiment.load_or_train_teacher(preset, data[0], "cpu", str(tmp_path))
    assert not cached and "trained with other settings" in capsys.readouterr().err
    assert experiment.load_teacher(str(tmp_path / "teacher.pt"))[1]["key"]  # the new one replaced it
