"""Writes an experiment's results as text: results.md (tables of mIoU, paired differences with
their intervals, per-class IoU, probes) and the comparisons with the committed runs. The plots:
plots.py."""
import json
import os
import statistics

from .models import FEATURE_LAYER
from .scenes import CLASSES, CONFUSABLE, THIN
from .stats import paired_difference

BASELINE, RIVAL = "ce", "ce+cwd"  # paired differences are taken to these configurations


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_config(results):
    """{configuration: [runs over seeds]} in the order of the experiment."""
    return {config: list(runs.values()) for config, runs in seed_runs(results).items()}


def wall_time_line(results):
    line = f"wall time {results['seconds'] / 60:.1f} min"
    cached = results.get("cached") or []
    if cached:
        line += (f" (this call {results['seconds_this_call'] / 60:.1f} min; cached from earlier calls: "
                 f"{', '.join(cached)})")
    return line


def seed_runs(results):
    """{configuration: {seed: run}} in the order of the experiment."""
    out = {}
    for key, run in results["runs"].items():
        config, seed = key.split("|")
        out.setdefault(config, {})[int(seed)] = run
    return out


def paired(runs_a, runs_b, value):
    """paired_difference of value(run) over the seeds both configurations ran."""
    seeds = sorted(set(runs_a) & set(runs_b))
    return paired_difference([value(runs_a[s]) for s in seeds], [value(runs_b[s]) for s in seeds])


def _interval(d):
    mean, lo, hi, n = d
    return f"{mean:+.2f}" if n < 2 else f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _miou(run):
    return 100 * run["miou"]


def _class_iou(k):
    return lambda run: 100 * run["iou"][k] if run["iou"][k] == run["iou"][k] else 0.0


# per-class columns: confusable groups first (thin classes marked *), then the rest
CLASS_ORDER = [k for g in CONFUSABLE.values() for k in g] + [k for k in range(len(CLASSES))
                                                             if not any(k in g for g in CONFUSABLE.values())]


def _class_header():
    return " | ".join(CLASSES[k] + ("*" if k in THIN else "") for k in CLASS_ORDER)


def comparisons(configs):
    """The configurations of `configs` that the others are paired with (ce, ce+cwd), where there
    is another to pair."""
    return [o for o in (BASELINE, RIVAL) if o in configs and len(configs) > 1]


def preset_text(preset):
    """The preset dict as results.md and tune.md print it; lists read back from JSON print as the
    tuples they were, so a file rewritten from its JSON is the same text."""
    return str({k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()})


def write_markdown(results, out, command=None):
    """Writes `out`/results.md and returns its text."""
    text = results_markdown(results, out, command)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def results_markdown(results, out, command=None):
    """The text of results.md for a run written to `out` (its links are relative to `out`)."""
    command = command or results.get("command", "")
    configs = seed_runs(results)
    t = results["teacher"]
    n_seeds = sorted({len(rs) for rs in configs.values()})
    split = results["preset"].get("eval_split", "val")
    others = comparisons(configs)  # a column per comparison that ran
    lines = ["# Distillation on generated street scenes\n"]
    if results["preset"].get("smoke"):
        lines += smoke_note(results, out)
    lines += [f"Command: `{command}`  ", f"Preset: `{preset_text(results['preset'])}`  ",
              f"Device: {results['device']}; {wall_time_line(results)}.\n"]
    if results["preset"].get("weights_from"):
        lines.append(f"Loss weights: {results['preset']['weights_from']}.\n")
    lines += [f"Teacher: mIoU **{100 * t['miou']:.2f}**, position-probe error {t['position_error']:.4f} "
              f"(probe on the teacher's `{FEATURE_LAYER}` features).\n",
              f"## Students ({split} mIoU over {'/'.join(map(str, n_seeds))} paired seeds)\n",
              "| configuration | seeds | mIoU % (mean +/- std) | " +
              "".join(f"vs {o}: paired difference [95 % CI] | " for o in others) +
              "IDD gap to teacher | position-probe error |",
              "|---|---:|---:|" + "---:|" * len(others) + "---:|---:|"]
    for c, rs in configs.items():
        m, s = _mean_std([_miou(r) for r in rs.values()])
        vs = "".join(f"{'(itself)' if o == c else _interval(paired(rs, configs[o], _miou))} | " for o in others)
        gap = statistics.mean(r["distance_gap"] for r in rs.values())
        pos = [r["position_error"] for r in rs.values() if "position_error" in r]
        pos_text = "not measured" if not pos else (f"{pos[0]:.4f} (1 seed)" if len(pos) == 1 else
                                                   "{:.4f} +/- {:.4f}".format(*_mean_std(pos)))
        lines.append(f"| {c} | {len(rs)} | {m:.2f} +/- {s:.2f} | {vs}{gap:.4f} | {pos_text} |")
    lines.append("")
    if others:
        lines.append("Paired difference: for each seed, the configuration's mIoU minus that of the configuration "
                     "named, both trained from the same student initialisation on the same batches; mean over "
                     "seeds with a two-sided Student-t 95 % interval (n - 1 degrees of freedom). An interval that "
                     "excludes 0 is a difference this experiment resolves; one that straddles 0 is not.\n")
    if BASELINE in others:
        lines += [f"## Per-class IoU: paired difference to {BASELINE} (mean over seeds; + = better)\n",
                  "Columns grouped by confusable appearance (" + "; ".join(
                      f"{g}: {', '.join(CLASSES[k] for k in ks)}" for g, ks in CONFUSABLE.items()) +
                  "); * thin classes; † the 95 % interval excludes 0.\n",
                  "| configuration | " + _class_header() + " |", "|---|" + "---:|" * len(CLASSES)]
        for c, rs in configs.items():
            if c == BASELINE:
                continue
            cells = []
            for k in CLASS_ORDER:
                mean, lo, hi, n = paired(rs, configs[BASELINE], _class_iou(k))
                cells.append(f"{mean:+.1f}" + ("†" if n > 1 and (lo > 0 or hi < 0) else ""))
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Per-class IoU % (mean over seeds)\n", "| network | " + _class_header() + " |",
              "|---|" + "---:|" * len(CLASSES),
              "| teacher | " + " | ".join(f"{100 * t['iou'][k]:.1f}" for k in CLASS_ORDER) + " |"]
    for c, rs in configs.items():
        lines.append(f"| {c} | " + " | ".join(f"{statistics.mean(_class_iou(k)(r) for r in rs.values()):.1f}"
                                               for k in CLASS_ORDER) + " |")
    lines.append("\nIDD gap: the normalised IDD loss between the student's and the teacher's class-centroid "
                 f"distances on the {split} set (lower = closer inter-class structure). Position-probe error: "
                 f"MSE of a read-out trained to regress position maps from the frozen `{FEATURE_LAYER}` features "
                 "of each student (the network named in the row; mean +/- std over the seeds probed), "
                 "lower = more position information.\n")
    if not results["preset"].get("smoke"):
        lines += sizes_note(results, out)
    if "step_time" in results:
        st = results["step_time"]
        timed = (f"median of {len(st['rounds']['fused'])} alternating rounds of {st['steps']} steps each"
                 if "rounds" in st else "10 steps each")
        lines.append(f"Training step of `ce+kd+idd+pid` ({timed}"
                     + (f", after {st['warmup_steps']} untimed steps of both" if "warmup_steps" in st else "")
                     + f", on {results['device']}): "
                     f"{1e3 * st['fused']:.0f} ms with idd_ops' fused losses, {1e3 * st['reference']:.0f} ms with the "
                     "plain-PyTorch reference losses. This times whole training steps of a small network, of which "
                     "the distillation losses are only a part; on a CPU shared with other work the "
                     "load moves both numbers by more than the losses' share, so it cannot rank the kernels. "
                     "The kernels' own speed, against the reference and torch.compile, is measured by "
                     "benchmarks/ (benchmarks/RESULTS.md, RESULTS-cuda.md).\n")
    paired_plot = "`paired.png` (paired differences with their intervals), " if others else ""
    lines.append(f"Plots: {paired_plot}`miou.png` (every seed and the "
                 "mean +/- std), `loss_curves.png` (one panel per loss term, unweighted), `predictions.png` "
                 "(every configuration, first seed).\n")
    return "\n".join(lines)


# the checkout this module lies in (in an installed package: site-packages, with no results/)
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = ("results/cpu", "results/full")  # the committed runs, one a preset (64x128, 128x256)


def _committed(folder):
    """A committed results folder's results.json, or None where it has none."""
    path = os.path.join(REPOSITORY, folder, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _size(results):
    return "x".join(map(str, results["preset"]["size"]))


def effects(results, against=BASELINE):
    """{configuration: paired mIoU difference to `against`} ({} where `against` did not run)."""
    runs = seed_runs(results)
    return {c: paired(rs, runs[against], _miou) for c, rs in runs.items() if c != against} if against in runs else {}


def _interval_cells(results, against=BASELINE):
    """{configuration: its paired difference to `against` as table text}."""
    return {c: _interval(d) for c, d in effects(results, against).items()}


def _link(out, folder):
    """A link from `out`/results.md to the committed `folder`'s results.md."""
    return os.path.relpath(os.path.join(REPOSITORY, folder, "results.md"), os.path.abspath(out))


def _effects_table(title, columns, names):
    """A markdown table: a row per configuration in `names`, a column per (header, {configuration:
    cell text})."""
    return [f"| {title} | " + " | ".join(h for h, _ in columns) + " |", "|---|" + "---:|" * len(columns)] + [
        f"| {c} | " + " | ".join(cells.get(c, "not run") for _, cells in columns) + " |" for c in names] + [""]


def _others(out, folders):
    """{folder: results} of the committed runs other than the one written to `out`."""
    here = os.path.realpath(out)
    return {f: r for f in folders
            if os.path.realpath(os.path.join(REPOSITORY, f)) != here and (r := _committed(f)) is not None}


def smoke_note(results, out, folders=COMMITTED):
    """The lines that open a smoke run's results.md (in `out`): what it cannot show, and the
    committed runs' effects beside its own."""
    configs = seed_runs(results)
    committed = _others(out, folders)
    seeds = len(results["preset"]["seeds"])
    lines = ["**A smoke run.** This preset checks that the experiment runs end to end in a few minutes: its "
             f"teacher and students train for a fraction of the schedule, on {seeds} paired seed"
             f"{'s' if seeds > 1 else ''}, so its intervals are too wide to say whether distillation helps. "
             "That answer comes from the committed runs, with 5 paired seeds and longer schedules" +
             (":" if committed else " (results/cpu and results/full in the repository).") + "\n"]
    if committed:
        mine = _interval_cells(results)
        mine.update({c: f"no {BASELINE} run to pair" for c in configs if c != BASELINE and c not in mine})
        columns = [(f"this run ({_size(results)})", mine)] + [
            (f"[{f}]({_link(out, f)}) ({_size(r)})", _interval_cells(r))
            for f, r in committed.items()]
        names = list(dict.fromkeys(list(mine) + [c for _, cells in columns[1:] for c in cells]))
        lines += _effects_table(f"mIoU difference to {BASELINE} [95 % CI]", columns, names)
    return lines


def committed_table(folders=COMMITTED):
    """The README's table: the committed runs' paired mIoU differences to ce, a column per run
    (tests/test_demo_results.py checks that the README shows this text)."""
    columns = [(f"[{f}]({_link(REPOSITORY, f)}) ({_size(r)})", _interval_cells(r))
               for f in folders if (r := _committed(f)) is not None]
    names = list(dict.fromkeys(c for _, cells in columns for c in cells))
    return _effects_table(f"mIoU difference to {BASELINE} [95 % CI]", columns, names)


def sizes_note(results, out, folders=COMMITTED):
    """A run's section beside the committed runs at other image sizes: the paired mIoU
    differences to ce and to ce+cwd and the position-probe errors, size by size (what the run adds
    at its resolution). No lines where no other size is committed."""
    others = {f: r for f, r in _others(out, folders).items() if _size(r) != _size(results)}
    if not others:
        return []
    runs = {f"this run ({_size(results)})": results}
    runs.update({f"[{f}]({_link(out, f)}) ({_size(r)})": r for f, r in others.items()})
    names = list(dict.fromkeys(c for r in runs.values() for c in seed_runs(r)))

    def probe(r):
        cells = {"teacher": f"{r['teacher']['position_error']:.4f}"} if "position_error" in r["teacher"] else {}
        cells.update({c: f"{statistics.mean(p):.4f}" for c, rs in seed_runs(r).items()
                      if (p := [x["position_error"] for x in rs.values() if "position_error" in x])})
        return cells

    lines = ["## Beside the other image sizes\n",
             "The same configurations in the committed runs at other sizes (their own seeds, teachers and "
             "tuned weights); an effect is resolved at a size where its interval excludes 0.\n"]
    for against in (BASELINE, RIVAL):
        lines += _effects_table(f"mIoU difference to {against} [95 % CI]",
                                [(h, _interval_cells(r, against)) for h, r in runs.items()],
                                [c for c in names if c != against])
    lines += _effects_table("position-probe error (mean over seeds)", [(h, probe(r)) for h, r in runs.items()],
                            ["teacher"] + names)
    return lines
