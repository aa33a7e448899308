"""Writes an experiment's results: a markdown table and PNG plots (mIoU per configuration,
loss curves per term, predictions of every network)."""
import os
import statistics

import torch
import torch.nn.functional as F

from .experiment import FEATURE_LAYER, config_weights
from .scenes import CLASSES, IGNORE_INDEX

# one colour per class (sky, building, road, sidewalk, vegetation, car, person, pole); ignored: black
CLASS_COLOURS = ("#87ceeb", "#8c564b", "#7f7f7f", "#e377c2", "#2ca02c", "#1f77b4", "#d62728", "#ffbf00")
IGNORE_COLOUR = "#000000"
TERMS = ("ce", "kd", "idd", "pid", "skd", "ifvd", "cwd")


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_config(results):
    """{configuration: [runs over seeds]} in the order of the experiment."""
    out = {}
    for key, run in results["runs"].items():
        out.setdefault(key.split("|")[0], []).append(run)
    return out


def wall_time_line(results):
    line = f"wall time {results['seconds'] / 60:.1f} min"
    cached = results.get("cached") or []
    if cached:
        line += (f" (this call {results['seconds_this_call'] / 60:.1f} min; cached from earlier calls: "
                 f"{', '.join(cached)})")
    return line


def write_markdown(results, out, command=None):
    command = command or results.get("command", "")
    configs = by_config(results)
    t = results["teacher"]
    n_seeds = sorted({len(rs) for rs in configs.values()})
    lines = ["# Distillation on generated street scenes\n", f"Command: `{command}`  ",
             f"Preset: `{results['preset']}`  ", f"Device: {results['device']}; {wall_time_line(results)}.\n",
             f"Teacher: mIoU **{100 * t['miou']:.2f}**, position-probe error {t['position_error']:.4f} "
             f"(probe on the teacher's `{FEATURE_LAYER}` features).\n",
             f"## Students (validation mIoU, mean +/- std over {'/'.join(map(str, n_seeds))} seeds)\n",
             "| configuration | seeds | mIoU % | " + " | ".join(CLASSES) + " | IDD gap to teacher | position-probe error |",
             "|---|---:|---:|" + "---:|" * len(CLASSES) + "---:|---:|"]
    for c, rs in configs.items():
        m, s = _mean_std([100 * r["miou"] for r in rs])
        per_class = [statistics.mean([100 * r["iou"][i] for r in rs if r["iou"][i] == r["iou"][i]] or [float("nan")])
                     for i in range(len(CLASSES))]
        gap = statistics.mean(r["distance_gap"] for r in rs)
        pos = [r["position_error"] for r in rs if "position_error" in r]
        pos_text = "not measured" if not pos else (f"{pos[0]:.4f} (1 seed)" if len(pos) == 1 else
                                                   "{:.4f} +/- {:.4f}".format(*_mean_std(pos)))
        lines.append(f"| {c} | {len(rs)} | {m:.2f} +/- {s:.2f} | " + " | ".join(f"{v:.1f}" for v in per_class) +
                     f" | {gap:.4f} | {pos_text} |")
    lines.append("\nIDD gap: the normalised IDD loss between the student's and the teacher's class-centroid "
                 "distances on the validation set (lower = closer inter-class structure). Position-probe error: "
                 f"MSE of a read-out trained to regress position maps from the frozen `{FEATURE_LAYER}` features "
                 "of each student (the network named in the row; mean +/- std over the seeds probed), "
                 "lower = more position information.\n")
    if "step_time" in results:
        st = results["step_time"]
        lines.append(f"Training step of `ce+kd+idd+pid`: {1e3 * st['fused']:.0f} ms with idd_ops' fused losses, "
                     f"{1e3 * st['reference']:.0f} ms with the plain-PyTorch reference losses.\n")
    lines.append("Plots: `miou.png` (every seed and the mean +/- std), `loss_curves.png` (one panel per loss "
                 "term, unweighted), `predictions.png` (every configuration, first seed).\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_miou(results, out):
    """A dot plot zoomed to the students: every seed, the mean and +/- one standard deviation."""
    plt = _pyplot()
    configs = by_config(results)
    names = list(configs)[::-1]  # first configuration on top
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.6))
    lo, hi = float("inf"), float("-inf")
    for y, c in enumerate(names):
        vals = [100 * r["miou"] for r in configs[c]]
        m, s = _mean_std(vals)
        ax.plot(vals, [y] * len(vals), "o", color="0.6", ms=4, zorder=2)
        ax.errorbar([m], [y], xerr=[s], fmt="D", color="tab:blue", ms=6, capsize=4, zorder=3)
        ax.annotate(f"{m:.2f} +/- {s:.2f}", (m, y), xytext=(0, 7), textcoords="offset points", ha="center",
                    fontsize=8)
        lo, hi = min(lo, *vals, m - s), max(hi, *vals, m + s)
    pad = max(0.5, 0.15 * (hi - lo))
    teacher = 100 * results["teacher"]["miou"]
    if lo - pad <= teacher <= hi + pad:
        ax.axvline(teacher, color="tab:red", ls="--", label=f"teacher {teacher:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(-0.6, len(names) - 0.3)
    ax.set_yticks(range(len(names)), names)
    ax.grid(axis="x", alpha=0.3)
    n = sorted({len(rs) for rs in configs.values()})
    ax.set_xlabel("validation mIoU (%)")
    ax.set_title(f"Students: grey dots = seeds; blue = mean +/- std over {'/'.join(map(str, n))} seeds\n"
                 f"(teacher: {teacher:.2f} mIoU" + (", off the axis)" if not lo - pad <= teacher <= hi + pad else ")"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "miou.png"), dpi=100)
    plt.close(fig)


def _smooth(values, width=25):
    width = max(1, min(width, len(values) // 10 or 1))
    t = torch.tensor(values, dtype=torch.float64)
    csum = torch.cumsum(torch.cat([t.new_zeros(1), t]), 0)
    return ((csum[width:] - csum[:-width]) / width).tolist()


def plot_losses(results, out):
    """One panel per loss term (the teacher's CE first), each term unweighted (before its
    loss weight), first seed of every configuration that uses it, moving average."""
    plt = _pyplot()
    preset_weights = results["preset"].get("weights") or {}
    first = {}
    for key, run in results["runs"].items():
        first.setdefault(key.split("|")[0], run)
    terms = [t for t in TERMS if any(t in r["curves"] for r in first.values())]
    panels = ["teacher ce"] + terms
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(first)}
    axes[0][0].plot(_smooth(results["teacher"]["curve"]), color="black")
    axes[0][0].set_title("teacher: cross-entropy", fontsize=9)
    for ax, term in zip(axes.flat[1:], terms):
        for c, run in first.items():
            if term in run["curves"]:
                w = 1.0 if term == "ce" else (run.get("weights") or config_weights(c, preset_weights))[term]
                ax.plot(_smooth([v / w for v in run["curves"][term]]), color=colours[c], label=c, lw=1.2)
        ax.set_title(f"students: {term}" + (" (cross-entropy)" if term == "ce" else " (unweighted)"), fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes.flat[:len(panels)]:
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle("Training losses per term (moving average, first seed; distillation terms before their weight)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=100)
    plt.close(fig)


def plot_predictions(models, val, out, device, n=3):
    """Image, label and the prediction of every network in `models` ([(name, model)]) for the
    first `n` validation images, with a class-colour legend."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cmap = ListedColormap(list(CLASS_COLOURS) + [IGNORE_COLOUR])
    ignore_code = len(CLASS_COLOURS)
    n = min(n, len(val))
    x = val.images[:n].to(device).float() / 255
    y = val.labels[:n].long()
    y = torch.where(y == IGNORE_INDEX, torch.full_like(y, ignore_code), y)
    with torch.no_grad():
        preds = [F.interpolate(m(x), size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1).cpu()
                 for _, m in models]
    cols = 2 + len(models)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 1.25 * n + 1.3), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(x[i].permute(1, 2, 0).cpu().numpy())
        for j, lab in enumerate([y[i]] + [p[i] for p in preds]):
            axes[i][1 + j].imshow(lab.numpy(), cmap=cmap, vmin=0, vmax=ignore_code, interpolation="nearest")
    for j, title in enumerate(["image", "label"] + [name for name, _ in models]):
        axes[0][j].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    handles = [Patch(color=c, label=k) for k, c in zip(CLASSES, CLASS_COLOURS)]
    handles.append(Patch(color=IGNORE_COLOUR, label="ignored (label only: border band around objects, not scored)"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(os.path.join(out, "predictions.png"), dpi=100)
    plt.close(fig)


def write_plots(results, teacher, runs, val, out, device):
    """All three plots; `runs` maps (configuration, seed) to runs holding the student's weights."""
    from .models import make_student

    plot_miou(results, out)
    plot_losses(results, out)
    models = [("teacher", teacher)]
    for c in dict.fromkeys(c for c, _ in runs):
        m = make_student(len(CLASSES)).to(device)
        m.load_state_dict(runs[(c, min(s for cc, s in runs if cc == c))]["model"])
        models.append((f"{c} (student)", m.eval()))
    plot_predictions(models, val, out, device)
