"""What the distillation losses cost in a training step at Cityscapes shapes, fused vs reference.

Student: a small head at the feature resolution of a 512x1024 image, [B, 64, 64, 128] in ->
1x1 conv, BN, ReLU -> 512-channel features -> 1x1 classifier -> 19-class logits, upsampled
(bilinear) to the 512x1024 labels for cross-entropy. Teacher: frozen outputs of the same batch,
2048-channel features and 19-class logits at 64x128 (computed once: its forward is the same with
either loss and a real teacher's would dwarf this head). Losses, each beside CE:

    kd        pixel_kd_loss(student logits, teacher logits), 64x128, T = 1
    idd       inter_class_distance_loss(512-ch student, 2048-ch teacher features, labels, 19)
    position  position_encoding_loss(R(student features), 5 maps), R a student read-out
              (PositionEncodingModule; PID's teacher-free variant, the one with a fused op)
    skd       structural_kd_loss(student, teacher features), pool 2
    ifvd      intra_class_variation_loss(student, teacher features, labels, 19)
    cwd       channel_wise_distillation_loss(student logits, teacher logits), T = 4

One step = student forward, CE + loss, backward, SGD update. For each loss three steps run in
alternation: CE alone, CE + fused loss (idd_ops), CE + reference loss (idd_ops.reference);
a loss's cost is its step's time minus the CE-only step's, and its share is that cost over its
step. The head is small, so shares are upper bounds of a real network's; the costs in ms carry
over. Peak memory: benchmarks.peak's profiler method, over one step.

    python -m benchmarks.train_step            # all six losses (about 5 min on 2 CPU cores)
    python -m benchmarks.train_step --update   # written to benchmarks/TRAIN_STEP.md (-cuda.md on a GPU)

Writes results/bench-<date-time>/TRAIN_STEP.md unless --out or --update names the file.
"""
import argparse
import os
import sys
import time

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
import torch
import torch.nn.functional as F
from torch import nn

import idd_ops
from idd_ops import reference
from idd_ops.nn import PositionEncodingModule

from .cases import POSITION_KINDS

K, C_IN, C_S, C_T, H, W, SCALE = 19, 64, 512, 2048, 64, 128, 8
LOSSES = ("kd", "idd", "position", "skd", "ifvd", "cwd")
EXPECTED = "about 5 min on 2 CPU cores"


def make_data(B, device="cpu"):
    """Input, labels and the frozen teacher's features and logits of one batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C_IN, H, W, generator=g)
    with torch.no_grad():
        t_feats = torch.relu(F.conv2d(x, torch.randn(C_T, C_IN, 1, 1, generator=g) / C_IN ** 0.5))
        t_logits = F.conv2d(t_feats, torch.randn(K, C_T, 1, 1, generator=g) / C_T ** 0.5)
    labels = common.street_labels(B, H * SCALE, W * SCALE, K)
    return {k: v.to(device) for k, v in dict(x=x, t_feats=t_feats, t_logits=t_logits, labels=labels).items()}


def distill_term(loss, impl, device):
    """(term(feats, logits, data) -> loss tensor, extra trainable modules) for one loss of `impl`
    (idd_ops or idd_ops.reference)."""
    if loss == "position":
        readout = PositionEncodingModule(C_S, POSITION_KINDS).to(device)
        return lambda f, z, d: impl.position_encoding_loss(readout(f), POSITION_KINDS), [readout]
    terms = {
        "kd": lambda f, z, d: impl.pixel_kd_loss(z, d["t_logits"], temperature=1.0),
        "idd": lambda f, z, d: impl.inter_class_distance_loss(f, d["t_feats"], d["labels"], K),
        "skd": lambda f, z, d: impl.structural_kd_loss(f, d["t_feats"], 2),
        "ifvd": lambda f, z, d: impl.intra_class_variation_loss(f, d["t_feats"], d["labels"], K),
        "cwd": lambda f, z, d: impl.channel_wise_distillation_loss(z, d["t_logits"], 4.0),
    }
    if loss not in terms:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return terms[loss], []


def make_step(data, loss=None, impl=None, device="cpu"):
    """(step closure, its parameters): one training step with CE, plus `loss` of `impl` if given."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(C_IN, C_S, 1), nn.BatchNorm2d(C_S), nn.ReLU()).to(device)
    classifier = nn.Conv2d(C_S, K, 1).to(device)
    term, extra = distill_term(loss, impl, device) if loss else (None, [])
    params = [p for m in [body, classifier] + extra for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        feats = body(data["x"])
        logits = classifier(feats)
        up = F.interpolate(logits, scale_factor=SCALE, mode="bilinear", align_corners=False)
        total = F.cross_entropy(up, data["labels"], ignore_index=255)
        if term:
            total = total + term(feats, logits, data)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return step, params


def measure_loss(loss, data, device, repeat):
    """Times (ms) and peaks (bytes) of the CE-only, fused and reference steps, timed alternately."""
    steps = [make_step(data, device=device), make_step(data, loss, idd_ops, device),
             make_step(data, loss, reference, device)]
    times = common.time_interleaved([s for s, _ in steps], device, repeat=repeat, stat=min)
    peaks = []
    for step, params in steps:
        for p in params:
            p.grad = None  # freed before the measured step, which then allocates every gradient
        peaks.append(peak.measure(step, device, held=lambda: [p.grad for p in params]))
    return times, peaks


def table(results):
    head = ["loss", "CE-only step ms", "step with fused ms", "step with reference ms", "step: reference / fused",
            "fused loss ms", "reference loss ms", "fused loss share", "reference loss share", "CE-only peak MiB",
            "fused step peak MiB", "reference step peak MiB", "gradients MiB"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for loss, (ce, fused, ref), peaks in results:
        mib = [f"{p / 2**20:.0f}" + (" !" if p < r else "") for p, r in peaks]
        out.append("| " + " | ".join([loss, f"{ce:.0f}", f"{fused:.0f}", f"{ref:.0f}", f"{ref / fused:.2f}x",
                                      f"{fused - ce:.0f}", f"{ref - ce:.0f}", f"{(fused - ce) / fused:.0%}",
                                      f"{(ref - ce) / ref:.0%}"] + mib + [f"{peaks[1][1] / 2**20:.1f}"]) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES, help="losses to run (default: all)")
    ap.add_argument("--skip", nargs="+", default=(), choices=LOSSES, help="losses to leave out")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5, help="timing rounds (default 5)")
    ap.add_argument("--device", default="cpu")
    common.add_allocator_option(ap)
    ap.add_argument("--out", default=None, help="markdown file (default: results/bench-<date-time>/TRAIN_STEP.md)")
    ap.add_argument("--update", action="store_true",
                    help="write the committed benchmarks/TRAIN_STEP.md (TRAIN_STEP-cuda.md with --device cuda)")
    args = ap.parse_args(argv)
    allocator = common.apply_allocator_option(args)
    on_cuda = args.device.startswith("cuda")
    committed = "benchmarks/TRAIN_STEP-cuda.md" if on_cuda else "benchmarks/TRAIN_STEP.md"
    if args.update and args.out:
        ap.error(f"--update writes {committed}; leave out --out")
    out = committed if args.update else args.out or os.path.join(
        "results", time.strftime("bench-%Y%m%d-%H%M%S"), os.path.basename(committed))
    losses = [name for name in args.losses if name not in args.skip]
    print(f"benchmarks.train_step: {EXPECTED if losses == list(LOSSES) else ''}; writing {out}", file=sys.stderr,
          flush=True)
    data = make_data(args.batch, args.device)
    results, start = [], time.perf_counter()
    for i, loss in enumerate(losses):
        elapsed = time.perf_counter() - start
        left = f", about {elapsed / i * (len(losses) - i) / 60:.1f} min left" if i else ""
        print(f"[{i + 1}/{len(losses)}] {loss} ({elapsed / 60:.1f} min so far{left})", file=sys.stderr, flush=True)
        times, peaks = measure_loss(loss, data, args.device, args.repeat)
        results.append((loss, times, peaks))
    dev = torch.cuda.get_device_name() if on_cuda else f"{torch.get_num_threads()} CPU threads"
    text = (f"Command: `python -m benchmarks.train_step {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            f"One training step at Cityscapes shapes: B={args.batch}, student features {C_S}x{H}x{W}, teacher "
            f"features {C_T}x{H}x{W}, logits {K}x{H}x{W} upsampled to labels {H * SCALE}x{W * SCALE} for CE "
            f"(benchmarks/train_step.py describes the head and each loss). {args.device} ({dev}), torch "
            f"{torch.__version__}, float32, the best of {args.repeat} rounds (as in RESULTS.md), the three steps of a row alternating. "
            f"Allocator: {allocator}. Loss ms = step - CE-only step (noise can make it negative); share = loss ms / step. "
            f"Peak memory: {peak.METHOD}; gradients MiB: the parameter gradients a fused step leaves, which no "
            f"peak may be below ('!').\n\n" + table(results))
    print(text)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
