"""The end-to-end demo: scene generator, metrics, and one training step of every configuration."""
import dataclasses
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import idd_ops
from idd_ops.demo import experiment
from idd_ops.demo.metrics import confusion_matrix, iou_per_class, mean_iou
from idd_ops.demo.models import FEATURE_LAYER, make_student, make_teacher
from idd_ops.demo.scenes import (BUILDING, CLASSES, CONFUSABLE, IGNORE_INDEX, OBJECTS, ROAD, SIDEWALK, SKY, THIN,
                                 StreetScenes, render_scene)


def test_generator_is_deterministic():
    a, b = render_scene(3, seed=5, size=(48, 96)), render_scene(3, seed=5, size=(48, 96))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = render_scene(4, seed=5, size=(48, 96))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("index", range(6))
def test_labels_are_consistent(index):
    image, label = render_scene(index, size=(64, 128))
    assert image.shape == (3, 64, 128) and 0 <= image.min() and image.max() <= 1
    values = set(label.unique().tolist())
    assert values <= set(range(len(CLASSES))) | {IGNORE_INDEX}
    top, bottom = set(label[0].tolist()), set(label[-1].tolist())
    assert not top & {ROAD, SIDEWALK} and not bottom & {SKY, BUILDING}  # position carries meaning
    # ignored pixels are background on object borders: an object pixel in their 3x3 neighbourhood
    ignored = label == IGNORE_INDEX
    obj = torch.zeros_like(ignored)
    for cls in OBJECTS:
        obj |= label == cls
    near = F.max_pool2d(obj[None, None].float(), 3, 1, 1)[0, 0] > 0
    assert not (ignored & ~near).any()
    assert obj.any() or not ignored.any()


def test_confusable_classes_share_their_appearance():
    """Within a confusable group the classes' colours come from one distribution: across images,
    the mean colours of its members differ by much less than one image's colour varies."""
    means = {k: [] for k in range(len(CLASSES))}
    for i in range(40):
        image, label = render_scene(i, size=(64, 128))
        for k in means:
            if (label == k).sum() > 10:
                means[k].append(image[:, label == k].mean(1))
    for group, members in CONFUSABLE.items():
        seen = [torch.stack(means[k]) for k in members if len(means[k]) > 4]
        for a in seen[1:]:
            spread = torch.cat([seen[0], a]).std(0).mean()
            assert (a.mean(0) - seen[0].mean(0)).abs().max() < spread, group
            assert spread > 0.08, group


def test_every_class_occurs_and_thin_ones_reach_the_feature_stride():
    """All 19 classes appear in a few dozen scenes; near thin objects are as wide as the
    networks' stride (8 pixels) in some scene at the cpu preset's size, so they exist in the
    features too."""
    seen, widest = set(), {k: 0 for k in THIN}
    for i in range(60):
        _, label = render_scene(i, size=(64, 128))
        seen |= set(label.unique().tolist())
        for k in THIN:
            widest[k] = max(widest[k], int((label == k).sum(1).max()))
    assert set(range(len(CLASSES))) <= seen
    assert all(w >= 8 for w in widest.values()), widest


def test_paired_interval_matches_student_t():
    from idd_ops.demo.stats import paired_difference, t_quantile

    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)
    mean, lo, hi, n = paired_difference([61.0, 62.5, 60.0, 63.0, 61.5], [60.0, 61.0, 59.5, 62.0, 60.0])
    diffs = torch.tensor([1.0, 1.5, 0.5, 1.0, 1.5], dtype=torch.float64)
    half = 2.7764 * diffs.std() / 5 ** 0.5
    assert n == 5 and mean == pytest.approx(1.1)
    assert (lo, hi) == pytest.approx((1.1 - half.item(), 1.1 + half.item()), abs=1e-3)
    assert paired_difference([1.0], [0.0])[1] != paired_difference([1.0], [0.0])[1]  # NaN: one pair


def test_miou_hand_computed():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    conf = confusion_matrix(pred, label, 4)
    # class 0: tp 1, fp 1 (pixel (1,1)), fn 1 (pixel (0,1)) -> 1/3; class 1: tp 3, fp 1 -> 3/4;
    # class 2: tp 1, fn 1 -> 1/2; class 3: absent everywhere -> left out
    iou = iou_per_class(conf)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert torch.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_models_expose_features_at_output_stride_8():
    for model in (make_teacher(8), make_student(8), make_student(8, padding_mode="zeros")):
        feats = {}
        model.get_submodule(FEATURE_LAYER).register_forward_hook(lambda m, i, o: feats.update(f=o))
        logits = model(torch.randn(2, 3, 64, 128))
        assert logits.shape == (2, 8, 8, 16) and feats["f"].shape[-2:] == (8, 16)


def _small_setup(**changes):
    """(preset, train set, teacher, read-out) small enough for a few student steps in a test."""
    preset = dataclasses.replace(experiment.PRESETS["quick"], size=(32, 64), batch=2, **changes)
    train = StreetScenes(4, seed=1, size=preset.size)
    teacher = make_teacher(len(CLASSES)).eval().requires_grad_(False)
    readout = idd_ops.nn.PositionEncodingModule(teacher.feature_channels, experiment.POSITION_KINDS, hidden=8)
    return preset, train, teacher, readout


@pytest.mark.parametrize("config", list(experiment.CONFIGS))
def test_one_training_step_per_configuration(config):
    preset, train, teacher, readout = _small_setup()
    student, curves, _ = experiment.train_student(preset, config, 0, train, teacher, readout, "cpu", steps=1)
    assert set(curves) == {"ce", *experiment.CONFIGS[config]}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in curves.values())


def test_progress_lines_name_the_weights_a_run_overrides(capsys):
    # the tuning trains one configuration at several weights: its progress lines must tell them apart
    assert experiment.run_label("ce+idd", 100, {}) == "ce+idd seed 100"
    assert experiment.run_label("ce+idd", 100, {"idd": 3.0, "cwd": 30.0}) == "ce+idd seed 100, idd weight 3"
    assert experiment.run_label("ce+kd+idd+pid", 0, {"pid": 0.3, "idd": 1.0}) == \
        "ce+kd+idd+pid seed 0, pid weight 0.3, idd weight 1"
    preset, train, teacher, readout = _small_setup(weights={"idd": 0.3})
    experiment.train_student(preset, "ce+idd", 7, train, teacher, readout, "cpu", steps=1)
    assert "ce+idd seed 7, idd weight 0.3: 1/1" in capsys.readouterr().err


def test_step_time_takes_the_median_of_alternating_rounds(tmp_path):
    from idd_ops.demo.report import write_markdown

    preset, train, teacher, readout = _small_setup()
    st = experiment.step_time(preset, "ce+kd+idd+pid", train, teacher, readout, "cpu", steps=1, warmup=1, rounds=3)
    for name in ("fused", "reference"):
        assert len(st["rounds"][name]) == 3 and min(st["rounds"][name]) > 0
        assert st[name] == sorted(st["rounds"][name])[1]
    results = experiment.run_experiment(_tiny(smoke=True), str(tmp_path), "cpu", workers=1)[0]
    text = write_markdown(dict(results, step_time=st), str(tmp_path))
    assert "median of 3 alternating rounds of 1 steps each, after 1 untimed steps of both" in text


def _tiny(**changes):
    base = dataclasses.replace(experiment.PRESETS["quick"], size=(32, 64), train_images=4, val_images=4, batch=2,
                               teacher_steps=1, student_steps=1, seeds=(0,), configs=("ce", "ce+pid"), probe_steps=1,
                               weights_from="")
    return dataclasses.replace(base, **changes)


def test_cache_key_holds_every_setting():
    preset = _tiny()
    key = experiment.run_key(preset, "ce+pid", 0, "t1", "cpu")
    assert key == experiment.run_key(_tiny(), "ce+pid", 0, "t1", "cpu")
    changed = [experiment.run_key(_tiny(student_steps=2), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(_tiny(size=(64, 128)), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(_tiny(weights={"pid": 0.3}), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(_tiny(lr=1e-3), "ce+pid", 0, "t1", "cpu"),
               experiment.run_key(preset, "ce+pid", 1, "t1", "cpu"),
               experiment.run_key(preset, "ce", 0, "t1", "cpu"),
               experiment.run_key(preset, "ce+pid", 0, "t2", "cpu")]
    assert all(k != key for k in changed)
    # a weight override of a loss the configuration does not use changes nothing
    assert experiment.run_key(_tiny(weights={"idd": 3.0}), "ce+pid", 0, "t1", "cpu") == key
    assert experiment.teacher_key(_tiny(teacher_steps=2), "cpu") != experiment.teacher_key(preset, "cpu")


def test_the_teacher_key_holds_the_cpu_threads_it_trains_on():
    """A CPU teacher trained on other threads is another teacher (a cached one was reused whatever
    the thread count); on CUDA the threads change nothing."""
    preset, threads = _tiny(), torch.get_num_threads()
    keys = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            keys[n] = (experiment.teacher_key(preset, "cpu"), experiment.teacher_key(preset, "cuda"))
    finally:
        torch.set_num_threads(threads)
    assert keys[1][0] != keys[2][0] and keys[1][1] == keys[2][1]


@pytest.fixture
def one_thread():
    """These models are tiny: with several threads, OpenMP barriers dominate, and on a busy
    machine they make this test minutes long instead of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_experiment_caches_announces_and_reruns_changed_settings(tmp_path, capsys, one_thread):
    from idd_ops.demo.report import write_markdown, write_plots

    out = str(tmp_path)
    results, teacher, runs, val = experiment.run_experiment(_tiny(), out, "cpu", command="test")
    assert results["cached"] == [] and results["seconds"] == results["seconds_this_call"]
    assert all("position_error" in r for r in results["runs"].values())  # every configuration probed
    capsys.readouterr()
    again = experiment.run_experiment(_tiny(), out, "cpu")[0]
    err = capsys.readouterr().err
    assert "cache: using" in err and again["cached"] == ["teacher", "ce|0", "ce+pid|0"]
    assert again["runs"]["ce|0"]["miou"] == results["runs"]["ce|0"]["miou"]
    assert again["seconds"] > again["seconds_this_call"]  # cached pieces count with the time they took
    changed = experiment.run_experiment(_tiny(student_steps=2), out, "cpu")[0]
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


def test_setup_without_torch_stops_with_instructions():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; exec(open('setup.py').read())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation" in proc.stderr and "download.pytorch.org/whl/cpu" in proc.stderr


def test_weights_and_the_tuning_grid_are_read_by_one_rule():
    """--weight and the tuner's --grid: one loss a name (a combination would train its default
    weights at every point), each given once, finite weights >= 0."""
    assert experiment.parse_loss_weights(["idd=0.3,1"], "--grid", several=True) == {"idd": [0.3, 1.0]}
    assert experiment.parse_loss_weights(["idd=0.3", "cwd=30"], "--weight") == {"idd": 0.3, "cwd": 30.0}
    for bad in ("nope=1", "kd+idd+pid=1", "ce=1"):  # the combination would train its defaults at every point
        with pytest.raises(ValueError, match="--grid: expected LOSS=V1,V2,... with LOSS one of kd, idd, pid, skd, "
                                             "ifvd, cwd"):
            experiment.parse_loss_weights([bad], "--grid", several=True)
    with pytest.raises(ValueError, match="--weight: expected LOSS=VALUE"):  # one value only
        experiment.parse_loss_weights(["idd=0.3,1"], "--weight")


def test_tuning_picks_the_best_paired_weight(tmp_path, one_thread):
    from idd_ops.demo import tune

    summary = tune.run_tuning(_tiny(), {"pid": [0.5, 2.0]}, [0, 1], str(tmp_path), workers=1)
    points = summary["points"]
    assert [q["weight"] for q in points] == [0.5, 2.0] and summary["preset"]["eval_split"] == "tune"
    assert points[0]["difference"] != points[1]["difference"]  # the weight reached the runs
    best = max(points, key=lambda q: q["difference"][0])
    assert summary["chosen"] == {"pid": best["weight"]}
    side = "highest" if best["weight"] == 2.0 else "lowest"  # two weights: either choice is an edge
    assert "Chosen weights" in (text := (tmp_path / "tune.md").read_text())
    assert f"On the grid's edge: pid {best['weight']:g} (its {side} weight)" in text


def test_tuning_names_a_choice_on_its_grids_edge():
    from idd_ops.demo import tune

    grid = {"idd": [0.3, 1.0, 3.0], "pid": [0.1, 1.0], "cwd": [0.0, 1.0], "kd": [10.0]}
    # 0 is CE itself, nothing lies below it; a single weight was compared with nothing
    assert tune.edge_choices(grid, {"idd": 3.0, "pid": 0.1, "cwd": 0.0, "kd": 10.0}) == {"idd": "highest",
                                                                                         "pid": "lowest"}
    assert tune.edge_choices(grid, {"idd": 1.0, "pid": 1.0, "cwd": 1.0}) == {"pid": "highest", "cwd": "highest"}


@pytest.mark.parametrize("folder", ["cpu-tune", "full-tune"])
def test_committed_tuning_text_is_its_json(folder):
    from idd_ops.demo import tune

    path = os.path.join(os.path.dirname(__file__), "..", "results", folder)
    with open(os.path.join(path, "tune.json")) as f, open(os.path.join(path, "tune.md")) as g:
        assert tune.tune_markdown(json.load(f)) == g.read()


@pytest.mark.parametrize("folder", ["cpu", "full"])
def test_committed_results_text_is_its_json(folder):
    # what --replot rewrites (its note on predictions.png aside) is the committed text, so a
    # replot changes a committed results.md only where the report itself changed
    from idd_ops.demo.report import results_markdown

    path = os.path.join(os.path.dirname(__file__), "..", "results", folder)
    with open(os.path.join(path, "results.json")) as f, open(os.path.join(path, "results.md")) as g:
        results, text = json.load(f), g.read()
    results.setdefault("command", text.split("`")[1])
    assert text.split("\nReplotted from results.json")[0] == results_markdown(results, path)


def test_readme_shows_the_committed_results():
    from idd_ops.demo.report import committed_table

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        assert "\n".join(committed_table()) in f.read()


def test_tune_command_runs_a_named_preset(tmp_path, monkeypatch, capsys, one_thread):
    from idd_ops.demo import tune

    monkeypatch.setitem(experiment.PRESETS, "tiny", _tiny())
    tune.main(["--preset", "tiny", "--grid", "idd=1", "--seeds", "0", "1", "--out", str(tmp_path), "--workers", "1",
               "--student-steps", "2", "--teacher-steps", "3"])
    assert "python -m idd_ops.demo.tune --preset tiny" in capsys.readouterr().out
    shown = json.loads((tmp_path / "tune.json").read_text())["preset"]
    assert (shown["student_steps"], shown["teacher_steps"], shown["size"]) == (2, 3, [32, 64])  # overrides, preset


def test_full_preset_holds_the_committed_128x256_tuning():
    # carried in the preset, so that an installed package (no results/ beside it) runs with them too
    with open(os.path.join(os.path.dirname(__file__), "..", "results", "full-tune", "tune.json")) as f:
        tuning = json.load(f)
    full = experiment.PRESETS["full"]
    assert tuple(tuning["preset"]["size"]) == full.size and tuning["chosen"] == full.weights
    assert "results/full-tune" in full.weights_from
    assert experiment.config_weights("ce+kd+idd+pid", full.weights) == {"kd": 10.0, "idd": 3.0, "pid": 1.0}


def test_a_tuning_given_to_the_run_must_be_one_at_its_size(tmp_path, capsys):
    from idd_ops.demo import cli

    path = tmp_path / "tune.json"
    path.write_text('{"chosen": {"idd": 0.5, "cwd": 3}, "preset": {"size": [64, 128]}}')
    weights, source = experiment.read_tuning(str(path), (64, 128))
    assert weights == {"idd": 0.5, "cwd": 3} and f"at 64x128 ({path})" in source
    cases = [("", "No such file"), ('{"chosen": {"idd": 1}}', "KeyError: 'preset'"),
             ('{"chosen": {"kd+idd": 1}, "preset": {"size": [64, 128]}}', "chosen weights"),
             ('{"chosen": {"idd": 1}, "preset": {"size": [128, 256]}}', "was tuned at 128x256; this run's images "
                                                                        "are 64x128")]
    for content, message in cases:
        if content:
            path.write_text(content)
        else:
            path.unlink()
        with pytest.raises(SystemExit) as stop:
            cli.main(["--preset", "cpu", "--tuning", str(path), "--out", str(tmp_path / "out")])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_configs_hold_the_committed_64x128_tuning():
    # the cpu and quick presets (64x128) take CONFIGS' weights: they must be what the committed tuning chose
    with open(os.path.join(os.path.dirname(__file__), "..", "results", "cpu-tune", "tune.json")) as f:
        tuning = json.load(f)
    assert tuple(tuning["preset"]["size"]) == experiment.PRESETS["cpu"].size == experiment.PRESETS["quick"].size
    for loss, weight in tuning["chosen"].items():
        used = {config: w[loss] for config, w in experiment.CONFIGS.items() if loss in w}
        assert used and set(used.values()) == {weight}, (loss, weight, used)


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


def test_worker_processes_give_the_runs_of_one_by_one(tmp_path):
    """Two single-threaded worker processes and one run after the other in this process, both
    with one thread per run (this process keeps its own setting for the rest, the teacher's
    training included): the same teacher, the same runs bit for bit, ce+idd and ce+kd included,
    which read the teacher's tables; each worker wrote its cache piece, which a rerun takes.
    Before the tables and the one-worker runs took this process's threads, --workers 1 and 2
    gave different numbers on 2 cores."""
    preset = _tiny(seeds=(0, 1), student_steps=3, configs=("ce", "ce+idd", "ce+kd"))
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
    other = experiment.run_experiment(_tiny(seeds=(0,), student_steps=3, configs=("ce",)), two, "cpu", workers=1,
                                      threads=2)[0]
    assert other["cached"] == ["teacher"]
    # a teacher given from elsewhere says so where the wall time counts it
    given = experiment.run_experiment(_tiny(seeds=(0,), configs=("ce",)), str(tmp_path / "three"), "cpu", workers=1,
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


def test_scene_progress_comes_at_least_every_tenth():
    """Chunks of 50 scenes gave the quick preset's 200 training images a line every 25 %."""
    seen = []
    StreetScenes(20, seed=1, size=(8, 16), progress=lambda done, total: seen.append(done))
    assert seen == list(range(2, 21, 2))


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


def test_results_md_has_no_empty_column_and_a_smoke_run_says_so(tmp_path, one_thread):
    from idd_ops.demo.report import write_markdown

    results = experiment.run_experiment(_tiny(smoke=True), str(tmp_path), "cpu", workers=1)[0]
    text = write_markdown(results, str(tmp_path))
    assert "vs ce+cwd" not in text and "| |" not in text.replace("|---|", "")
    assert "A smoke run" in text
    assert "Loss weights" not in text  # weights_from is empty for a preset built in code
    text = write_markdown(dict(results, preset=dict(results["preset"], smoke=False, weights_from="tuned")),
                          str(tmp_path))
    assert "smoke" not in text.lower().replace("'smoke': false", "") and "Loss weights: tuned." in text


@pytest.mark.parametrize("configs", [("ce",), ("ce+idd",), ("ce+idd", "ce+pid")])
def test_results_md_of_a_run_with_nothing_to_pair_has_no_paired_parts(tmp_path, configs):
    """--configs ce alone had an empty per-class table of differences and named a paired.png
    with nothing in it; without ce or ce+cwd the text still explained a paired column."""
    from idd_ops.demo.report import results_markdown

    with open(os.path.join(os.path.dirname(__file__), "..", "results", "cpu", "results.json")) as f:
        results = json.load(f)
    results["runs"] = {k: r for k, r in results["runs"].items() if k.split("|")[0] in configs}
    text = results_markdown(results, str(tmp_path))
    assert "Paired difference:" not in text and "paired.png" not in text and "vs ce" not in text
    assert "paired difference to ce" not in text and all(f"| {c} | 5 |" in text for c in configs)


def test_a_run_at_another_size_shows_the_committed_runs_beside_its_own(tmp_path):
    """results.md of a full run (128x256) sets its paired differences and probe errors beside the
    committed 64x128 run's; a run at the committed size, or written into the committed folder
    itself, does not repeat them."""
    from idd_ops.demo.report import REPOSITORY, effects, sizes_note, write_markdown

    with open(os.path.join(REPOSITORY, "results", "cpu", "results.json")) as f:
        committed = json.load(f)
    full = json.loads(json.dumps(committed))
    full["preset"]["size"] = [128, 256]
    full["runs"] = {k: dict(r, miou=r["miou"] + (0.01 if k.startswith("ce+idd|") else 0.0))
                    for k, r in full["runs"].items()}
    text = write_markdown(full, str(tmp_path))
    section = text[text.index("## Beside the other image sizes"):]
    row = next(line for line in section.splitlines() if line.startswith("| ce+idd |"))
    mine, theirs = effects(full)["ce+idd"], effects(committed)["ce+idd"]
    assert row == f"| ce+idd | {mine[0]:+.2f} [{mine[1]:+.2f}, {mine[2]:+.2f}] | " \
                  f"{theirs[0]:+.2f} [{theirs[1]:+.2f}, {theirs[2]:+.2f}] |"
    assert abs(mine[0] - theirs[0] - 1.0) < 1e-9
    assert "| mIoU difference to ce+cwd [95 % CI] | this run (128x256) | [results/cpu](" in section
    teacher = f"{committed['teacher']['position_error']:.4f}"
    assert f"| teacher | {teacher} | {teacher} |" in section
    assert sizes_note(committed, str(tmp_path), folders=("results/cpu",)) == []  # the same size
    assert sizes_note(full, os.path.join(REPOSITORY, "results", "cpu"), folders=("results/cpu",)) == []


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


@pytest.mark.parametrize("argv, text", [(["--workers", "0"], "--workers: expected an int >= 1"),
                                        (["--student-steps", "-1"], "--student-steps: expected an int >= 1"),
                                        (["--grid", "idd=-1"], "finite weights >= 0"),
                                        (["--grid", "idd=a"], "finite weights >= 0"),
                                        (["--teacher", "/nonexistent/teacher.pt"], "--teacher: no file"),
                                        (["--seeds", "1", "1"], "names one twice"),
                                        (["--grid", "idd=1", "--grid", "idd=0.3,3"], "--grid: idd is given twice"),
                                        (["--grid", "idd=1,1"], "'idd=1,1' names a weight twice"),
                                        (["--out", os.path.join(__file__, "sub")], "--out: cannot create the folder")])
def test_the_tuning_rejects_bad_flags_before_any_work(argv, text, capsys):
    from idd_ops.demo import tune

    with pytest.raises(SystemExit) as stop:
        tune.main(argv)
    assert stop.value.code == 2 and text in capsys.readouterr().err


@pytest.mark.parametrize("main", ["cli", "tune"])
def test_a_teacher_of_another_image_size_is_refused(tmp_path, capsys, main):
    """A 64x128 teacher given to the full preset (128x256) was taken, and the results described
    the preset's teacher instead."""
    from idd_ops.demo import cli, tune

    path = tmp_path / "teacher.pt"
    torch.save({"model": make_teacher(len(experiment.CLASSES)).state_dict(), "curve": [],
                "key": {"size": [8, 16]}}, path)
    with pytest.raises(SystemExit) as stop:
        {"cli": cli, "tune": tune}[main].main(["--preset", "full", "--teacher", str(path)])
    assert stop.value.code == 2
    assert "was trained on 8x16 images; the full preset's are 128x256" in capsys.readouterr().err


def _without_curves(results):
    """results.json of results/cpu with every run's loss curves taken out: its text can be written,
    its loss plot not."""
    if isinstance(results, dict):
        return {k: _without_curves(v) for k, v in results.items() if k != "curves"}
    return [_without_curves(v) for v in results] if isinstance(results, list) else results


@pytest.mark.parametrize("content", ["{", '{"preset": {}}', "[1, 2]", "no curves"])
def test_replot_of_a_results_json_it_did_not_write_is_an_argument_error(tmp_path, capsys, content):
    """An error, and the folder left as it was: nothing redrawn, nothing deleted, nothing staged."""
    pytest.importorskip("matplotlib")
    from idd_ops.demo import cli

    if content == "no curves":
        with open(os.path.join(os.path.dirname(__file__), "..", "results", "cpu", "results.json")) as f:
            content = json.dumps(_without_curves(json.load(f)))
    (tmp_path / "results.json").write_text(content)
    before = {name: "an earlier run's" for name in ("results.md", "paired.png", "miou.png", "loss_curves.png")}
    for name, text in before.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--replot", str(tmp_path)])
    assert stop.value.code == 2 and "results.json is not one idd-distill wrote" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.name != "results.json"} == before


def test_replot_and_weight_options_that_would_do_something_else_are_errors(capsys):
    from idd_ops.demo import cli

    for argv, message in ((["--replot", ""], "--replot: '' holds no results.json"),
                          (["--weight", "idd=0.3", "--weight", "idd=3"], "--weight: idd is given twice")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


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
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
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


def test_a_cached_teacher_of_another_network_is_trained_again(tmp_path, capsys, one_thread):
    """A teacher.pt in the output folder whose weights no longer fit (an older version's
    network) is a stale cache piece: trained again, not a traceback. Given as --teacher it is
    an error (test_the_cli_refuses_a_teacher_file_that_is_not_one)."""
    torch.save({"model": {"w": torch.zeros(2)}, "curve": [], "key": {}}, tmp_path / "teacher.pt")
    preset = _tiny()
    data = experiment.make_data(preset)
    teacher, _, _, cached = experiment.load_or_train_teacher(preset, data[0], "cpu", str(tmp_path))
    assert not cached and "trained with other settings" in capsys.readouterr().err
    assert experiment.load_teacher(str(tmp_path / "teacher.pt"))[1]["key"]  # the new one replaced it


def test_the_cli_needs_matplotlib_before_any_work(monkeypatch, capsys):
    """Without matplotlib the run would train for minutes and fail at its plots."""
    import builtins

    from idd_ops.demo import cli

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(cli, "run_experiment", lambda *a, **k: pytest.fail("ran without matplotlib"))
    with pytest.raises(SystemExit) as stop:
        cli.main(["--preset", "quick"])
    assert stop.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
