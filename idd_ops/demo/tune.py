"""Loss-weight tuning on the tune split: for each loss and weight, CE alone and CE + that loss
are trained on paired seeds and evaluated on generated images that the reported tables never
use (the "tune" split); the weight with the best mean paired mIoU difference is chosen.

    python -m idd_ops.demo.tune --preset cpu --out results/cpu-tune     # 64x128 (about 35 min on 2 CPU cores)
    python -m idd_ops.demo.tune --preset full --device cuda             # 128x256 (GPU)

Default grid: idd, pid and cwd at 0.3, 1 and 3; seeds 100, 101, 102. Writes tune.md and tune.json
(every point, the chosen weights; tune.md names each choice that lies on its grid's edge, past
which a better weight may lie) in --out (default results/<preset>-tune); `idd-distill --tuning
<out>/tune.json` runs a preset with the weights it chose. The teacher and every
run are cached there as in idd-distill, so an interrupted tuning resumes; all runs of the grid
go to one pool of worker processes.
"""
import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys

import torch

from .._arguments import device, make_out, positive_int, seed
from .cli import check_run_options, restart_with_environment, resumable
from .experiment import make_data, run_students, setup_teacher
from .presets import PRESETS, parse_loss_weights
from .report import BASELINE, _interval, _miou, paired, preset_text
from .workers import Workers

DEFAULT_GRID = ("idd=0.3,1,3", "pid=0.3,1,3", "cwd=0.3,1,3")
DEFAULT_SEEDS = (100, 101, 102)


def run_tuning(preset, grid, seeds, out, device="cpu", command="", teacher_checkpoint=None, workers=None,
               threads=None):
    """Returns {"points": [...], "chosen": {loss: weight}, ...} and writes tune.md / tune.json.
    The runs of every point and the CE runs they are paired with go to one pool."""
    seeds = tuple(seeds)
    base = dataclasses.replace(preset, seeds=seeds, eval_split="tune", weights={})
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    wanted = [(loss, value) for loss, values in grid.items() for value in values]
    jobs = [(base, BASELINE, s) for s in seeds] + [
        (dataclasses.replace(base, weights={loss: value}), f"ce+{loss}", s) for loss, value in wanted for s in seeds]
    with Workers(device, workers, threads) as pool:
        train, val = make_data(base, pool.map)
        results, teacher, readout, _ = setup_teacher(base, out, device, train, val, teacher_checkpoint)
        runs = run_students(jobs, train, val, teacher, readout, out, device, pool)[0]
    by_seed = [dict(zip(seeds, runs[i:i + len(seeds)])) for i in range(0, len(runs), len(seeds))]
    ce_runs, points, chosen = by_seed[0], [], {}
    for (loss, value), mine in zip(wanted, by_seed[1:]):
        points.append(dict(loss=loss, weight=value, difference=paired(mine, ce_runs, _miou),
                           miou=statistics.mean(_miou(r) for r in mine.values()),
                           distance_gap=statistics.mean(r["distance_gap"] for r in mine.values()),
                           position_error=statistics.mean(r["position_error"] for r in mine.values())))
    for loss in grid:
        chosen[loss] = max((q for q in points if q["loss"] == loss), key=lambda q: q["difference"][0])["weight"]
    shown = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("configs", "weights", "weights_from")}
    summary = {"command": command, "preset": shown, "device": str(device), "grid": grid, "points": points,
               "chosen": chosen, "teacher_miou": 100 * results["teacher"]["miou"],
               "ce_miou": statistics.mean(_miou(r) for r in ce_runs.values())}
    with open(os.path.join(out, "tune.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "tune.md"), "w") as f:
        f.write(tune_markdown(summary))
    return summary


def edge_choices(grid, chosen):
    """{loss: "highest" | "lowest"} for each loss whose chosen weight is the highest of its grid, or
    the lowest where that is above 0 (a weight of 0 is CE itself: nothing lies below it); a better
    weight may lie past that edge. A loss tried at one weight has no edge."""
    edges = {}
    for loss, weight in chosen.items():
        weights = grid[loss]
        if len(weights) > 1 and weight == max(weights):
            edges[loss] = "highest"
        elif len(weights) > 1 and weight == min(weights) > 0:
            edges[loss] = "lowest"
    return edges


def tune_markdown(summary):
    seeds = tuple(summary["preset"]["seeds"])
    lines = ["# Loss-weight tuning (tune split)\n", f"Command: `{summary.get('command', '')}`  ",
             f"Preset: `{preset_text(summary['preset'])}`  ",
             f"Seeds {seeds}, evaluated on the tune split (generated with its own seed; the reported tables use "
             f"the val split). Chosen: the weight with the best mean paired difference to {BASELINE}."]
    if "ce_miou" in summary:
        lines.append(f"Teacher {summary['teacher_miou']:.2f} mIoU, {BASELINE} {summary['ce_miou']:.2f} on this split.")
    lines += ["", f"| loss | weight | mIoU % | vs {BASELINE}: paired difference [95 % CI] | IDD gap | "
              "position-probe error | chosen |", "|---|---:|---:|---:|---:|---:|---|"]
    for q in summary["points"]:
        mark = "yes" if summary["chosen"].get(q["loss"]) == q["weight"] else ""
        lines.append(f"| {q['loss']} | {q['weight']:g} | {q['miou']:.2f} | {_interval(q['difference'])} | "
                     f"{q['distance_gap']:.4f} | {q['position_error']:.4f} | {mark} |")
    lines.append(f"\nChosen weights: `{summary['chosen']}`\n")
    edges = edge_choices(summary["grid"], summary["chosen"])
    if edges:
        named = ", ".join(f"{loss} {summary['chosen'][loss]:g} (its {side} weight)" for loss, side in edges.items())
        lines.append(f"On the grid's edge: {named}. A better weight may lie past it; a wider grid (--grid) "
                     "would show.\n")
    return "\n".join(lines)


def main(argv=None):
    if argv is None:
        restart_with_environment("idd_ops.demo.tune")  # as idd-distill: idle OpenMP threads sleep
    p = argparse.ArgumentParser(prog="python -m idd_ops.demo.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="image size and schedule of the runs (default: cpu)")
    p.add_argument("--grid", action="append", metavar="LOSS=V1,V2,...",
                   help=f"weights to try for one loss (repeatable); default: {' '.join(DEFAULT_GRID)}")
    p.add_argument("--seeds", nargs="+", type=seed, default=list(DEFAULT_SEEDS))
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where a GPU is visible, else cpu)")
    p.add_argument("--out", help="default: results/<preset>-tune")
    p.add_argument("--teacher", help="reuse this teacher.pt (same image size) instead of training one")
    p.add_argument("--workers", type=positive_int, help="worker processes for the runs (default: automatic)")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads each run computes on (default: the cores divided between the workers)")
    p.add_argument("--student-steps", type=positive_int, help="override the preset's student steps")
    p.add_argument("--teacher-steps", type=positive_int, help="override the preset's teacher steps")
    args = p.parse_args(argv)
    check_run_options(p, args)
    try:
        grid = parse_loss_weights(args.grid or DEFAULT_GRID, "--grid", several=True)
    except ValueError as e:
        p.error(str(e))
    out = args.out or os.path.join("results", f"{args.preset}-tune")
    make_out(p, out)
    command = "python -m idd_ops.demo.tune " + shlex.join(argv if argv is not None else sys.argv[1:])
    overrides = {k: v for k, v in dict(student_steps=args.student_steps, teacher_steps=args.teacher_steps).items()
                 if v}
    with resumable(out):
        summary = run_tuning(dataclasses.replace(PRESETS[args.preset], **overrides), grid, args.seeds, out,
                             args.device, command, args.teacher, args.workers, args.threads)
    print(tune_markdown(summary))


if __name__ == "__main__":
    main()
