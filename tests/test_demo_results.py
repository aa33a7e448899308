"""The experiment's report: results.md from results.json (the committed runs' text included),
the README's table, and --replot of a folder."""
import json
import os

import pytest

from idd_ops.demo import experiment

from demo_setup import REPOSITORY, committed_json, tiny_preset


@pytest.mark.parametrize("folder", ["cpu", "full"])
def test_committed_results_text_is_its_json(folder):
    # what --replot rewrites (its note on predictions.png aside) is the committed text, so a
    # replot changes a committed results.md only where the report itself changed
    from idd_ops.demo.report import results_markdown

    path = str(REPOSITORY / "results" / folder)
    with open(os.path.join(path, "results.json")) as f, open(os.path.join(path, "results.md")) as g:
        results, text = json.load(f), g.read()
    results.setdefault("command", text.split("`")[1])
    assert text.split("\nReplotted from results.json")[0] == results_markdown(results, path)


def test_readme_shows_the_committed_results():
    from idd_ops.demo.report import committed_table

    with open(REPOSITORY / "README.md") as f:
        assert "\n".join(committed_table()) in f.read()


def test_results_md_has_no_empty_column_and_a_smoke_run_says_so(tmp_path, one_thread):
    from idd_ops.demo.report import write_markdown

    results = experiment.run_experiment(tiny_preset(smoke=True), str(tmp_path), "cpu", workers=1)[0]
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

    results = committed_json("cpu", "results.json")
    results["runs"] = {k: r for k, r in results["runs"].items() if k.split("|")[0] in configs}
    text = results_markdown(results, str(tmp_path))
    assert "Paired difference:" not in text and "paired.png" not in text and "vs ce" not in text
    assert "paired difference to ce" not in text and all(f"| {c} | 5 |" in text for c in configs)


def test_a_run_at_another_size_shows_the_committed_runs_beside_its_own(tmp_path):
    """results.md of a full run (128x256) sets its paired differences and probe errors beside the
    committed 64x128 run's; a run at the committed size, or written into the committed folder
    itself, does not repeat them."""
    from idd_ops.demo.report import effects, sizes_note, write_markdown

    committed = committed_json("cpu", "results.json")
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
    assert sizes_note(full, str(REPOSITORY / "results" / "cpu"), folders=("results/cpu",)) == []


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
        content = json.dumps(_without_curves(committed_json("cpu", "results.json")))
    (tmp_path / "results.json").write_text(content)
    before = {name: "an earlier run's" for name in ("results.md", "paired.png", "miou.png", "loss_curves.png")}
    for name, text in before.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--replot", str(tmp_path)])
    assert stop.value.code == 2 and "results.json is not one idd-distill wrote" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.name != "results.json"} == before
