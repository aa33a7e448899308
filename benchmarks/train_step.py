"""End-to-end effect of the fused IDD loss on one training step at a realistic shape.

A small segmentation head (3x3 conv to 128 channels, 1x1 classifier to 19 classes) runs on
backbone-like inputs at 64x128 (1/8 of 512x1024); its logits are upsampled to the 512x1024
labels for cross-entropy, and IDD compares its 128-channel features with frozen 256-channel
teacher features. One step = forward, CE + IDD, backward and an SGD update; the IDD term comes
from idd_ops (fused) or idd_ops.reference, alternating in one process.

    python -m benchmarks.train_step        # B = 2, 4, 8 (about 2 min on 2 CPU cores)

Writes results/bench-<date-time>/train_step.md unless --out names a file.
"""
import argparse
import os
import sys
import time

from . import common  # first: sets the allocator before torch starts  # noqa: I001
import torch
import torch.nn.functional as F
from torch import nn

import idd_ops
from idd_ops import reference

K, C_IN, C_S, C_T = 19, 64, 128, 256


def make_step(impl, B, H=64, W=128, scale=8):
    """A closure running one training step with the IDD loss of `impl` (idd_ops or reference)."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(C_IN, C_S, 3, padding=1), nn.BatchNorm2d(C_S), nn.ReLU())
    classifier = nn.Conv2d(C_S, K, 1)
    params = list(head.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(B, C_IN, H, W)
    teacher = torch.randn(B, C_T, H, W)
    labels = common.street_labels(B, H * scale, W * scale, K)

    def step():
        feats = head(x)
        logits = F.interpolate(classifier(feats), scale_factor=scale, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=255) + \
            impl.inter_class_distance_loss(feats, teacher, labels, K)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="markdown file (default: results/bench-<date-time>/train_step.md)")
    args = ap.parse_args(argv)
    out = args.out or os.path.join("results", time.strftime("bench-%Y%m%d-%H%M%S"), "train_step.md")
    lines = [f"One training step (head + CE at 512x1024 + IDD at 64x128, K={K}, student C={C_S}, teacher "
             f"C={C_T}), torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeat}. "
             f"Command: `python -m benchmarks.train_step {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
             "| B | step with fused IDD (ms) | step with reference IDD (ms) | reference / fused |", "|---:|---:|---:|---:|"]
    for i, B in enumerate(args.batch):
        print(f"[{i + 1}/{len(args.batch)}] B={B}", file=sys.stderr, flush=True)
        fused, ref = common.time_interleaved([make_step(idd_ops, B), make_step(reference, B)], repeat=args.repeat)
        lines.append(f"| {B} | {fused:.0f} | {ref:.0f} | {ref / fused:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
