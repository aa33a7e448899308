"""The experiment's plots: mIoU per configuration, paired differences, loss curves per term and
the predictions of every network, as PNG files."""
import os

import torch
import torch.nn.functional as F

from .presets import config_weights
from .report import _mean_std, _miou, by_config, comparisons, paired, seed_runs
from .scenes import CLASSES, IGNORE_INDEX

# the Cityscapes palette, in CLASSES order; ignored: black
CLASS_COLOURS = ("#804080", "#f423e8", "#464646", "#66669c", "#be9999", "#999999", "#faaa1e", "#dcdc00", "#6b8e23",
                 "#98fb98", "#4682b4", "#dc143c", "#ff0000", "#00008e", "#000046", "#003c64", "#005064", "#0000e6",
                 "#770b20")
IGNORE_COLOUR = "#000000"
# the loss terms whose curves are drawn, in this order
TERMS = ("ce", "kd", "idd", "pid", "skd", "ifvd", "cwd")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (every plot here and benchmarks.sweep's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def require_matplotlib(parser, program):
    """An argument error when matplotlib (the plots drawn at the end) is missing: checked after the
    arguments, so that a bad flag is named first, and before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error(f"{program} draws its plots with matplotlib, which is not installed: pip install matplotlib "
                     "(or idd_ops[demo])")


def plot_miou(results, out):
    """A dot plot zoomed to the students: every seed, the mean and +/- one standard deviation."""
    plt = pyplot()
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


def plot_paired(results, out):
    """Paired mIoU differences with their 95 % intervals, to the CE student and to CWD."""
    plt = pyplot()
    configs = seed_runs(results)
    others = comparisons(configs)
    if not others:  # nothing to pair with: no plot, and none of an earlier run left in `out`
        if os.path.exists(os.path.join(out, "paired.png")):
            os.remove(os.path.join(out, "paired.png"))
        return
    fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 0.45 * len(configs) + 1.6), squeeze=False)
    for ax, other in zip(axes[0], others):
        names = [c for c in configs if c != other][::-1]
        for y, c in enumerate(names):
            mean, lo, hi, n = paired(configs[c], configs[other], _miou)
            resolved = n > 1 and (lo > 0 or hi < 0)
            colour = ("tab:green" if mean > 0 else "tab:red") if resolved else "0.4"
            if n > 1:
                ax.plot([lo, hi], [y, y], color=colour, lw=2)
            ax.plot([mean], [y], "D", color=colour, ms=6)
            ax.annotate(f"{mean:+.2f}", (mean, y), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(f"mIoU difference to {other} (points)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"paired by seed, 95 % t interval (n = {'/'.join(map(str, sorted({len(r) for r in configs.values()})))})"
                     "\ncoloured where the interval excludes 0", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "paired.png"), dpi=100)
    plt.close(fig)


def _smooth(values, width=25):
    width = max(1, min(width, len(values) // 10 or 1))
    t = torch.tensor(values, dtype=torch.float64)
    csum = torch.cumsum(torch.cat([t.new_zeros(1), t]), 0)
    return ((csum[width:] - csum[:-width]) / width).tolist()


def plot_losses(results, out):
    """One panel per loss term (the teacher's CE first), each term unweighted (before its
    loss weight), first seed of every configuration that uses it, moving average."""
    plt = pyplot()
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
    plt = pyplot()
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

    plot_paired(results, out)
    plot_miou(results, out)
    plot_losses(results, out)
    models = [("teacher", teacher)]
    for c in dict.fromkeys(c for c, _ in runs):
        m = make_student(len(CLASSES)).to(device)
        m.load_state_dict(runs[(c, min(s for cc, s in runs if cc == c))]["model"])
        models.append((f"{c} (student)", m.eval()))
    plot_predictions(models, val, out, device)
