"""Writes an experiment's results: a markdown table and PNG plots."""
import os
import statistics

import torch
import torch.nn.functional as F

from .scenes import CLASSES, IGNORE_INDEX


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_markdown(results, out, command):
    runs = results["runs"]
    configs = list(dict.fromkeys(k.split("|")[0] for k in runs))
    t = results["teacher"]
    lines = [f"# Distillation on generated street scenes\n", f"Command: `{command}`  ",
             f"Preset: `{results['preset']}`  ", f"Device: {results['device']}; wall time {results['seconds'] / 60:.1f} min.\n",
             f"Teacher: mIoU **{100 * t['miou']:.2f}**, position-probe error {t['position_error']:.4f}.\n",
             "## Students (validation mIoU, mean +/- std over seeds)\n",
             "| configuration | seeds | mIoU % | " + " | ".join(CLASSES) + " | IDD gap to teacher | position-probe error |",
             "|---|---:|---:|" + "---:|" * len(CLASSES) + "---:|---:|"]
    for c in configs:
        rs = [r for k, r in runs.items() if k.split("|")[0] == c]
        m, s = _mean_std([100 * r["miou"] for r in rs])
        per_class = [statistics.mean([100 * r["iou"][i] for r in rs if r["iou"][i] == r["iou"][i]] or [float("nan")])
                     for i in range(len(CLASSES))]
        gap = statistics.mean(r["distance_gap"] for r in rs)
        pos = next((r["position_error"] for r in rs if "position_error" in r), None)
        lines.append(f"| {c} | {len(rs)} | {m:.2f} +/- {s:.2f} | " + " | ".join(f"{v:.1f}" for v in per_class) +
                     f" | {gap:.4f} | {'' if pos is None else f'{pos:.4f}'} |")
    lines.append("\nIDD gap: the normalised IDD loss between the student's and the teacher's class-centroid "
                 "distances on the validation set (lower = closer inter-class structure). Position-probe error: "
                 "MSE of a read-out trained on frozen features to regress position maps (lower = more position "
                 "information).\n")
    if "step_time" in results:
        st = results["step_time"]
        lines.append(f"Training step of `ce+kd+idd+pid`: {1e3 * st['fused']:.0f} ms with idd_ops' fused losses, "
                     f"{1e3 * st['reference']:.0f} ms with the plain-PyTorch reference losses.\n")
    lines.append("Plots: `miou.png`, `loss_curves.png`, `predictions.png`.\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def write_plots(results, teacher, runs, val, out, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models import make_student

    configs = list(dict.fromkeys(c for c, _ in runs))
    # mIoU bars with error bars
    means, stds = [], []
    for c in configs:
        vals = [100 * r["miou"] for (cc, _), r in runs.items() if cc == c]
        m, s = _mean_std(vals)
        means.append(m), stds.append(s)
    fig, ax = plt.subplots(figsize=(1.4 * len(configs) + 2, 4))
    ax.bar(range(len(configs)), means, yerr=stds, capsize=4, color="tab:blue")
    ax.axhline(100 * results["teacher"]["miou"], color="tab:red", ls="--", label="teacher")
    ax.set_xticks(range(len(configs)), configs, rotation=20)
    ax.set_ylabel("validation mIoU (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "miou.png"), dpi=100)
    plt.close(fig)
    # loss curves (first seed of each configuration)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(results["teacher"]["curve"], color="tab:red")
    axes[0].set_title("teacher cross-entropy")
    for (c, s), r in runs.items():
        if s == min(ss for cc, ss in runs if cc == c):
            total = [sum(v) for v in zip(*r["curves"].values())]
            axes[1].plot(total, label=c, alpha=0.8)
    axes[1].set_title("student total loss")
    axes[1].legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=100)
    plt.close(fig)
    # prediction grid: image, label, teacher, CE student, distilled student
    shown = [c for c in ("ce", "ce+kd+idd+pid") if c in configs]
    models = [("teacher", teacher)]
    for c in shown:
        m = make_student(len(CLASSES)).to(device)
        m.load_state_dict(runs[(c, min(s for cc, s in runs if cc == c))]["model"])
        models.append((c, m.eval()))
    n = min(4, len(val))
    x = val.images[:n].to(device).float() / 255
    y = val.labels[:n]
    cols = 2 + len(models)
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 1.5 * n + 0.5), squeeze=False)
    cmap = plt.get_cmap("tab10", 10)
    show = lambda lab: torch.where(lab == IGNORE_INDEX, torch.tensor(9), lab)  # noqa: E731
    with torch.no_grad():
        preds = [F.interpolate(m(x), size=y.shape[-2:], mode="bilinear").argmax(1).cpu() for _, m in models]
    for i in range(n):
        axes[i][0].imshow(x[i].permute(1, 2, 0).cpu())
        axes[i][1].imshow(show(y[i]), cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
        for j, p in enumerate(preds):
            axes[i][2 + j].imshow(p[i], cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
    for j, title in enumerate(["image", "label"] + [name for name, _ in models]):
        axes[0][j].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "predictions.png"), dpi=100)
    plt.close(fig)
