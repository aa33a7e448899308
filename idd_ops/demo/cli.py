"""`idd-distill`: the end-to-end distillation experiment on generated street scenes.

    idd-distill --preset quick                  # about 5 minutes on a 2-core CPU
    idd-distill --preset cpu                    # all configurations, 3 seeds (~20 min on 2 cores)
    idd-distill --preset full --device cuda     # full resolution and schedule (GPU recommended)
"""
import argparse
import dataclasses
import os
import sys

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates: see ARCHITECTURE notes

import torch  # noqa: E402

from .experiment import CONFIGS, PRESETS, run_experiment  # noqa: E402
from .report import write_markdown, write_plots  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(prog="idd-distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", default=None, help="results folder (default: results/<preset>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="override the preset's configurations")
    p.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    p.add_argument("--student-steps", type=int, help="override the preset's student steps")
    p.add_argument("--teacher-steps", type=int, help="override the preset's teacher steps")
    p.add_argument("--weight", action="append", default=[], metavar="LOSS=VALUE",
                   help="override a loss weight in every configuration that uses it, e.g. idd=0.3 (repeatable)")
    p.add_argument("--teacher", default=None, help="reuse this teacher.pt (same image size) instead of training one")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in dict(configs=tuple(args.configs or ()), seeds=tuple(args.seeds or ()),
                                       student_steps=args.student_steps, teacher_steps=args.teacher_steps).items() if v}
    weights = {}
    for item in args.weight:
        name, _, value = item.partition("=")
        if name not in {"kd", "idd", "pid", "skd", "ifvd", "cwd"} or not value:
            p.error(f"--weight: expected LOSS=VALUE with LOSS in kd, idd, pid, skd, ifvd, cwd; got {item!r}")
        weights[name] = float(value)
    preset = dataclasses.replace(preset, weights=weights, **overrides)
    out = args.out or os.path.join("results", args.preset)
    command = "idd-distill " + " ".join(argv if argv is not None else sys.argv[1:])
    results, teacher, runs, val = run_experiment(preset, out, args.device, args.teacher)
    write_plots(results, teacher, runs, val, out, args.device)
    print(write_markdown(results, out, command))
    print(f"\nwritten to {out}/ (results.md, results.json, miou.png, loss_curves.png, predictions.png)")


if __name__ == "__main__":
    main()
