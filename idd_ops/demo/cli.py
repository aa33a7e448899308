"""`idd-distill`: the end-to-end distillation experiment on generated street scenes.

    idd-distill --preset quick                  # a smoke run: a few minutes on 2 CPU cores
    idd-distill --preset cpu                    # all configurations, 5 paired seeds (see the README for times)
    idd-distill --preset full --device cuda     # 128x256, the full schedule (GPU recommended)
    idd-distill --replot results/cpu            # rewrite results.md and plots from results.json

The student runs (configurations x seeds) and the scene generation run on a pool of worker
processes (--workers, default: automatic from the CPU cores and, on CUDA, the free GPU memory);
the results are those of one run after the other. Finished pieces (teacher, each configuration x
seed) are cached in the output folder under a key of every setting that changes them: rerunning
resumes, a changed setting reruns, and the command says which pieces it took from the cache.
Each preset's loss weights are those a tuning at its image size chose (results/cpu-tune,
results/full-tune); --tuning takes the weights of another tuning (python -m idd_ops.demo.tune),
and results.md says where they came from.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import tempfile

# Settings read once, when torch and its OpenMP runtime load (see docs/ARCHITECTURE.md, Demo);
# set them in the environment to override. THP: large tensors on transparent huge pages.
# PASSIVE: idle OpenMP workers sleep instead of spinning; these small models run many short
# parallel regions, and where other processes share the cores, spinning made steps 3-5x slower.
ENVIRONMENT = {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def restart_with_environment(module="idd_ops.demo.cli"):
    """Python imports the idd_ops package (and so torch) before this module runs, too late for
    ENVIRONMENT to take effect: restart the command once with it set."""
    missing = {k: v for k, v in ENVIRONMENT.items() if k not in os.environ}
    if missing:
        # rerun the way it was started: `python -m <module>` (argv[0] is a file) or the
        # `idd-distill` script (not `-m`, which would put the current folder first on sys.path)
        how = ["-m", module] if sys.argv[0].endswith(".py") else [sys.argv[0]]
        os.execve(sys.executable, [sys.executable, *how, *sys.argv[1:]], {**os.environ, **missing})


class _Stopped(KeyboardInterrupt):
    """A SIGTERM (a time limit's signal) raised where the program runs, so that it unwinds as
    Ctrl-C does: the shared run file is removed and nothing half-written is left."""


def _raise_stopped(signum, frame):
    raise _Stopped()


@contextlib.contextmanager
def resumable(out):
    """Ends an interrupted run (Ctrl-C, or SIGTERM from a time limit) with one line saying how to
    resume and the shell's status for the signal (130, 143), instead of a traceback."""
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    except KeyboardInterrupt as stop:
        print(f"\ninterrupted: the finished pieces are cached in {out}/; the same command resumes from them",
              file=sys.stderr)
        sys.exit(143 if isinstance(stop, _Stopped) else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


import torch  # noqa: E402

from .._arguments import device, make_out, positive_int, seed  # noqa: E402
from .experiment import load_teacher, run_experiment  # noqa: E402
from .presets import CONFIGS, PRESETS, parse_loss_weights, read_tuning  # noqa: E402
from .plots import plot_losses, plot_miou, plot_paired, require_matplotlib, write_plots  # noqa: E402
from .report import results_markdown, write_markdown  # noqa: E402

# measured with the command above (see the README and docs/EXPERIMENT.md for how)
ESTIMATES = {"quick": "a smoke run, about 2 min on 2 CPU cores",
             "cpu": "about 38 min on 2 idle CPU cores",
             "full": "3.1 min on one H200 with 16 runs side by side (results/full), 146 min on 2 "
                     "idle CPU cores"}


WRITTEN = ("results.md", "results.json", "paired.png", "miou.png", "loss_curves.png", "predictions.png")
REPLOTTED = ("results.md", "paired.png", "miou.png", "loss_curves.png")


def _written(folder, names):
    """The files of `names` that exist in `folder` (paired.png only where a run had a partner)."""
    return [n for n in names if os.path.exists(os.path.join(folder, n))]


def replot(folder):
    """Rewrites results.md, paired.png, miou.png and loss_curves.png of an earlier run from its
    results.json (no training; predictions.png is left as it is)."""
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    md = os.path.join(folder, "results.md")
    if not results.get("command") and os.path.exists(md):  # results.json of older versions lacks it
        with open(md) as f:
            results["command"] = next((line.split("`")[1] for line in f if line.startswith("Command: `")), "")
    # everything drawn before anything is replaced: a results.json that cannot be read leaves the
    # folder as it was
    text = results_markdown(results, folder) + (
        "\nReplotted from results.json by `idd-distill --replot`: `predictions.png` is the original run's, and "
        "'not measured' marks configurations that the version which ran the experiment did not probe.\n")
    with tempfile.TemporaryDirectory(dir=folder) as staged:
        for plot in (plot_paired, plot_miou, plot_losses):
            plot(results, staged)
        for name in REPLOTTED[1:]:
            if os.path.exists(os.path.join(staged, name)):
                os.replace(os.path.join(staged, name), os.path.join(folder, name))
            elif os.path.exists(os.path.join(folder, name)):  # paired.png of a run with nothing to pair
                os.remove(os.path.join(folder, name))
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"\nrewritten from {folder}/results.json: {', '.join(_written(folder, REPLOTTED))}")


def check_run_options(p, args):
    """The checks idd-distill and the tuning share, made before any work: --teacher a teacher
    checkpoint, --out a folder, no seed or configuration twice (--device is checked by its type)."""
    if args.teacher and not os.path.isfile(args.teacher):
        p.error(f"--teacher: no file {args.teacher!r} (without --teacher, a teacher is trained and cached)")
    if args.teacher:
        try:
            _, state = load_teacher(args.teacher)
        except ValueError as error:
            p.error(f"--teacher: {error}")
        size, wanted = state.get("key", {}).get("size"), list(PRESETS[args.preset].size)
        if size is not None and list(size) != wanted:
            p.error(f"--teacher: {args.teacher!r} was trained on {size[0]}x{size[1]} images; the {args.preset} preset's "
                    f"are {wanted[0]}x{wanted[1]}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out: {args.out!r} is a file; expected a folder")
    for name in ("configs", "seeds"):
        given = getattr(args, name, None) or []
        if len(set(given)) < len(given):
            p.error(f"--{name}: {' '.join(map(str, given))} names one twice")


def main(argv=None):
    if argv is None:
        restart_with_environment()
    p = argparse.ArgumentParser(prog="idd-distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="image size, schedule, configurations and seeds (default: quick)")
    p.add_argument("--out", default=None, help="results folder (default: results/<preset>)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where a GPU is visible, else cpu)")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="override the preset's configurations")
    p.add_argument("--seeds", nargs="+", type=seed, help="override the preset's seeds")
    p.add_argument("--student-steps", type=positive_int, help="override the preset's student steps")
    p.add_argument("--teacher-steps", type=positive_int, help="override the preset's teacher steps")
    p.add_argument("--weight", action="append", default=[], metavar="LOSS=VALUE",
                   help="override a loss weight in every configuration that uses it, e.g. idd=0.3 (repeatable)")
    p.add_argument("--tuning", metavar="TUNE_JSON",
                   help="take the IDD, PID and CWD weights a loss-weight tuning chose (the tune.json of python -m "
                        "idd_ops.demo.tune, at this preset's image size) instead of the preset's; --weight "
                        "overrides them")
    p.add_argument("--teacher", default=None, help="reuse this teacher.pt (same image size) instead of training one")
    p.add_argument("--workers", type=positive_int, help="worker processes for the student runs and scenes (default: "
                   "automatic, from the CPU cores and, on CUDA, the free GPU memory)")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads each run computes on (default: the cores divided between the workers); on "
                        "the CPU a run's numbers depend on it, so runs with other thread counts are not taken from "
                        "the cache")
    p.add_argument("--replot", metavar="FOLDER", help="only rewrite FOLDER's results.md and plots from its results.json")
    args = p.parse_args(argv)
    if args.replot is not None:  # an empty FOLDER (an unset variable) is an error, not a training run
        given = [a.option_strings[0] for a in p._actions
                 if a.dest not in ("replot", "help") and getattr(args, a.dest) != a.default]
        if given:  # replot reads the options the run had from its results.json; these would be ignored
            p.error(f"--replot: rewrites a finished run's results.md and plots and runs nothing; it takes no "
                    f"run options (got {' '.join(given)})")
        if not os.path.isfile(os.path.join(args.replot, "results.json")):
            p.error(f"--replot: {args.replot!r} holds no results.json")
        require_matplotlib(p, "idd-distill --replot")
        try:
            return replot(args.replot)
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
            p.error(f"--replot: {args.replot}/results.json is not one idd-distill wrote "
                    f"({type(error).__name__}: {error})")
    check_run_options(p, args)
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in dict(configs=tuple(args.configs or ()), seeds=tuple(args.seeds or ()),
                                       student_steps=args.student_steps, teacher_steps=args.teacher_steps).items() if v}
    try:
        weights = parse_loss_weights(args.weight, "--weight")
    except ValueError as error:
        p.error(str(error))
    configs = args.configs or preset.configs
    unused = [name for name in weights if not any(name in CONFIGS[c] for c in configs)]
    if unused:
        p.error(f"--weight: no configuration of this run uses {', '.join(unused)} (configurations: "
                f"{' '.join(configs)})")
    tuned, weights_from = preset.weights, preset.weights_from
    if args.tuning:
        try:
            tuned, weights_from = read_tuning(args.tuning, preset.size)
        except ValueError as error:
            p.error(f"--tuning: {error}")
    if weights:
        weights_from += f"; overridden on the command line: {weights}"
    preset = dataclasses.replace(preset, weights={**tuned, **weights}, weights_from=weights_from, **overrides)
    out = args.out or os.path.join("results", args.preset)
    make_out(p, out)
    require_matplotlib(p, "idd-distill")  # the plots are drawn at the end, after every run
    command = "idd-distill " + shlex.join(argv if argv is not None else sys.argv[1:])
    run_count = len(preset.configs) * len(preset.seeds)
    print(f"idd-distill --preset {args.preset}: {len(preset.configs)} configurations x {len(preset.seeds)} seeds "
          f"({run_count} student runs; the whole preset: {ESTIMATES[args.preset]}); writing to {out}/", file=sys.stderr)
    with resumable(out):
        results, teacher, runs, val = run_experiment(preset, out, args.device, args.teacher, command,
                                                     workers=args.workers, threads=args.threads)
    write_plots(results, teacher, runs, val, out, args.device)
    print(write_markdown(results, out))
    print(f"\nwritten to {out}/ ({', '.join(_written(out, WRITTEN))})")


if __name__ == "__main__":
    main()
