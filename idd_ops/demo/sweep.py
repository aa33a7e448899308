"""Collects the results of a loss-weight sweep (several `idd-distill --weight ...` runs) into
one markdown table.

    python -m idd_ops.demo.sweep results/sweep/idd_* results/sweep/pid_* --out results/sweep/sweep.md
"""
import argparse
import json
import os
import statistics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="result folders of idd-distill runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    lines = ["| run | weights | configuration | seeds | mIoU % (mean +/- std) | IDD gap to teacher |",
             "|---|---|---|---:|---:|---:|"]
    for folder in args.runs:
        with open(os.path.join(folder, "results.json")) as f:
            res = json.load(f)
        by_config = {}
        for key, run in res["runs"].items():
            by_config.setdefault(key.split("|")[0], []).append(run)
        for config, runs in by_config.items():
            mious = [100 * r["miou"] for r in runs]
            std = statistics.stdev(mious) if len(mious) > 1 else 0.0
            gap = statistics.mean(r["distance_gap"] for r in runs)
            lines.append(f"| {os.path.basename(folder)} | {res['preset'].get('weights') or 'defaults'} | {config} | "
                         f"{len(runs)} | {statistics.mean(mious):.2f} +/- {std:.2f} | {gap:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
