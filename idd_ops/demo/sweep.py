"""Loss-weight sweep on the tune split: for each loss and weight, CE alone and CE + that loss
are trained on paired seeds and evaluated on generated images that the reported tables never
use (the "tune" split); the weight with the best mean paired mIoU difference is chosen.

    python -m idd_ops.demo.sweep --preset cpu --grid idd=0.3,1,3 --grid pid=0.3,1,3 \\
        --grid cwd=0.3,1,3 --seeds 100 101 --out results/cpu-sweep

Writes sweep.md and sweep.json (every point, the chosen weights) in --out; the teacher and
every run are cached there as in idd-distill, so an interrupted sweep resumes.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys

import torch

from .experiment import CONFIGS, PRESETS, make_data, run_experiment
from .report import BASELINE, _interval, _miou, paired, seed_runs


def parse_grid(items):
    """["idd=0.3,1,3", ...] -> {"idd": [0.3, 1.0, 3.0], ...}"""
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if f"ce+{name}" not in CONFIGS or not values:
            raise ValueError(f"--grid: expected LOSS=V1,V2,... with a configuration ce+LOSS; got {item!r}")
        grid[name] = [float(v) for v in values.split(",")]
    return grid


def run_sweep(preset, grid, seeds, out, device="cpu", command=""):
    """Returns {"points": [...], "chosen": {loss: weight}} and writes sweep.md / sweep.json."""
    base = dataclasses.replace(preset, seeds=tuple(seeds), eval_split="tune")
    data = make_data(base)
    points, chosen = [], {}
    for loss, values in grid.items():
        for value in values:
            p = dataclasses.replace(base, configs=(BASELINE, f"ce+{loss}"), weights={loss: value})
            print(f"sweep: {loss} = {value}", file=sys.stderr)
            results = run_experiment(p, out, device, command=f"sweep {loss}={value}", data=data)[0]
            runs = seed_runs(results)
            mine = runs[f"ce+{loss}"]
            points.append(dict(loss=loss, weight=value, difference=paired(mine, runs[BASELINE], _miou),
                               miou=statistics.mean(_miou(r) for r in mine.values()),
                               distance_gap=statistics.mean(r["distance_gap"] for r in mine.values()),
                               position_error=statistics.mean(r["position_error"] for r in mine.values()),
                               teacher_miou=100 * results["teacher"]["miou"]))
        best = max((q for q in points if q["loss"] == loss), key=lambda q: q["difference"][0])
        chosen[loss] = best["weight"]
    shown = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("configs", "weights")}
    summary = {"command": command, "preset": shown, "grid": grid, "points": points, "chosen": chosen}
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(sweep_markdown(summary))
    return summary


def sweep_markdown(summary):
    lines = ["# Loss-weight sweep (tune split)\n", f"Command: `{summary.get('command', '')}`  ",
             f"Preset: `{summary['preset']}`  ",
             f"Seeds {summary['preset']['seeds']}, evaluated on the tune split (generated with its own seed; "
             "the reported tables use the val split). Chosen: the weight with the best mean paired "
             f"difference to {BASELINE}.\n",
             f"| loss | weight | mIoU % | vs {BASELINE}: paired difference [95 % CI] | IDD gap | position-probe error "
             "| chosen |", "|---|---:|---:|---:|---:|---:|---|"]
    for q in summary["points"]:
        mark = "yes" if summary["chosen"].get(q["loss"]) == q["weight"] else ""
        lines.append(f"| {q['loss']} | {q['weight']:g} | {q['miou']:.2f} | {_interval(q['difference'])} | "
                     f"{q['distance_gap']:.4f} | {q['position_error']:.4f} | {mark} |")
    lines.append(f"\nChosen weights: `{summary['chosen']}`\n")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--grid", action="append", required=True, metavar="LOSS=V1,V2,...")
    p.add_argument("--seeds", nargs="+", type=int, default=[100, 101])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
    except ValueError as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    command = "python -m idd_ops.demo.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = run_sweep(PRESETS[args.preset], grid, args.seeds, args.out, args.device, command)
    print(sweep_markdown(summary))


if __name__ == "__main__":
    main()
