"""The loss weights: the presets' and configurations' weights held to the committed tunings,
weights given on the command line, and the tuning on the tune split."""
import json
import os

import pytest

from idd_ops.demo import presets

from demo_setup import REPOSITORY, committed_json, tiny_preset


def test_weights_and_the_tuning_grid_are_read_by_one_rule():
    """--weight and the tuner's --grid: one loss a name (a combination would train its default
    weights at every point), each given once, finite weights >= 0."""
    assert presets.parse_loss_weights(["idd=0.3,1"], "--grid", several=True) == {"idd": [0.3, 1.0]}
    assert presets.parse_loss_weights(["idd=0.3", "cwd=30"], "--weight") == {"idd": 0.3, "cwd": 30.0}
    for bad in ("nope=1", "kd+idd+pid=1", "ce=1"):  # the combination would train its defaults at every point
        with pytest.raises(ValueError, match="--grid: expected LOSS=V1,V2,... with LOSS one of kd, idd, pid, skd, "
                                             "ifvd, cwd"):
            presets.parse_loss_weights([bad], "--grid", several=True)
    with pytest.raises(ValueError, match="--weight: expected LOSS=VALUE"):  # one value only
        presets.parse_loss_weights(["idd=0.3,1"], "--weight")


def test_tuning_picks_the_best_paired_weight(tmp_path, one_thread):
    from idd_ops.demo import tune

    summary = tune.run_tuning(tiny_preset(), {"pid": [0.5, 2.0]}, [0, 1], str(tmp_path), workers=1)
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

    text = (REPOSITORY / "results" / folder / "tune.md").read_text()
    assert tune.tune_markdown(committed_json(folder, "tune.json")) == text


def test_tune_command_runs_a_named_preset(tmp_path, monkeypatch, capsys, one_thread):
    from idd_ops.demo import tune

    monkeypatch.setitem(presets.PRESETS, "tiny", tiny_preset())
    tune.main(["--preset", "tiny", "--grid", "idd=1", "--seeds", "0", "1", "--out", str(tmp_path), "--workers", "1",
               "--student-steps", "2", "--teacher-steps", "3"])
    assert "python -m idd_ops.demo.tune --preset tiny" in capsys.readouterr().out
    shown = json.loads((tmp_path / "tune.json").read_text())["preset"]
    assert (shown["student_steps"], shown["teacher_steps"], shown["size"]) == (2, 3, [32, 64])  # overrides, preset


def test_full_preset_holds_the_committed_128x256_tuning():
    # carried in the preset, so that an installed package (no results/ beside it) runs with them too
    tuning = committed_json("full-tune", "tune.json")
    full = presets.PRESETS["full"]
    assert tuple(tuning["preset"]["size"]) == full.size and tuning["chosen"] == full.weights
    assert "results/full-tune" in full.weights_from
    assert presets.config_weights("ce+kd+idd+pid", full.weights) == {"kd": 10.0, "idd": 3.0, "pid": 1.0}


def test_configs_hold_the_committed_64x128_tuning():
    # the cpu and quick presets (64x128) take CONFIGS' weights: they must be what the committed tuning chose
    tuning = committed_json("cpu-tune", "tune.json")
    assert tuple(tuning["preset"]["size"]) == presets.PRESETS["cpu"].size == presets.PRESETS["quick"].size
    for loss, weight in tuning["chosen"].items():
        used = {config: w[loss] for config, w in presets.CONFIGS.items() if loss in w}
        assert used and set(used.values()) == {weight}, (loss, weight, used)


def test_a_tuning_given_to_the_run_must_be_one_at_its_size(tmp_path, capsys):
    from idd_ops.demo import cli

    path = tmp_path / "tune.json"
    path.write_text('{"chosen": {"idd": 0.5, "cwd": 3}, "preset": {"size": [64, 128]}}')
    weights, source = presets.read_tuning(str(path), (64, 128))
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
