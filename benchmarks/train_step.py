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

On a GPU with torchvision importable (--network auto, the default; or --network deeplabv3) the
step is a real one instead: torchvision DeepLabV3-ResNet50 student beside a frozen
DeepLabV3-ResNet101 teacher (random weights, nothing downloaded), images 3x512x1024, bf16
autocast, the teacher's forward inside every step; the losses take each backbone's output (2048
channels at 64x128) and the heads' logits. --kernels default next runs each CUDA kernel set in its
own process (IDD_OPS_CUDA_NEXT is read once per process) and adds a 'fused next' column.

    python -m benchmarks.train_step            # all six losses (about 5 min on 2 CPU cores)
    python -m benchmarks.train_step --update   # written to benchmarks/TRAIN_STEP.md (-cuda.md on a GPU)
    python -m benchmarks.train_step --device cuda --kernels default next --targets   # as tools/gpu_check.sh

Writes results/bench-<date-time>/TRAIN_STEP.md unless --out or --update names the file.
"""
import argparse
import os
import sys
import time
import traceback

from . import common, peak  # first: sets the allocator before torch starts  # noqa: I001
import torch
import torch.nn.functional as F
from torch import nn

import idd_ops
from idd_ops import reference
from idd_ops.nn import PositionEncodingModule

from . import cli, targets
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


def distill_term(loss, impl, device, channels=C_S):
    """(term(feats, logits, data) -> loss tensor, extra trainable modules) for one loss of `impl`
    (idd_ops or idd_ops.reference); channels: the student features' (the position read-out's input)."""
    if loss == "position":
        readout = PositionEncodingModule(channels, POSITION_KINDS).to(device)
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


def deeplabv3_pair(num_classes=K):
    """(teacher, student): torchvision's DeepLabV3-ResNet101 and DeepLabV3-ResNet50, random
    weights (nothing downloaded), no auxiliary head."""
    from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

    kw = dict(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return deeplabv3_resnet101(**kw), deeplabv3_resnet50(**kw)


def seg_forward(model, x):
    """(features, logits) of a torchvision segmentation model: the backbone's output (the
    classifier head's input: 2048 channels at 1/8 of the image for DeepLabV3-ResNet) and the
    head's logits at that resolution."""
    feats = model.backbone(x)["out"]
    return feats, model.classifier(feats)


def make_real_data(B, device="cpu", size=(H * SCALE, W * SCALE)):
    """Images and street-layout labels of one batch for the real networks."""
    x = torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(0))
    return dict(x=x.to(device), labels=common.street_labels(B, *size, K, device=device))


def make_real_step(nets, data, loss=None, impl=None, device="cpu", amp=None):
    """(step closure, its parameters): one step of a real student beside a frozen teacher:
    teacher forward (no gradient), student forward, CE on the upsampled logits + `loss` of
    `impl`, backward, SGD; under autocast to `amp` (a dtype) where given. nets = (teacher,
    student), shared by every step of a process (the teacher in eval mode)."""
    teacher, student = nets
    x, labels = data["x"], data["labels"]
    term, extra = distill_term(loss, impl, device, channels=_feature_channels(student, x)) if loss else (None, [])
    params = [p for m in [student] + extra for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            with torch.no_grad():
                t_feats, t_logits = seg_forward(teacher, x)
            feats, logits = seg_forward(student, x)
            up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            total = F.cross_entropy(up, labels, ignore_index=255)
            if term:
                total = total + term(feats, logits, dict(t_feats=t_feats, t_logits=t_logits, labels=labels))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return step, params


def _feature_channels(model, x):
    with torch.no_grad():
        return model.backbone(x[:1, :, :64, :64])["out"].shape[1]


STEP_IMPLS = ("ce", "fused", "reference")


def measure_loss(loss, data, device, repeat, impls=STEP_IMPLS, peaks=True, nets=None, amp=None):
    """A row: times (ms) and, unless peaks=False, peaks (bytes) of the CE-only, fused and
    reference steps (those of `impls`), timed alternately. nets: real (teacher, student), else the
    small head."""
    modules = {"ce": None, "fused": idd_ops, "reference": reference}

    def build(impl):
        if nets is not None:
            return make_real_step(nets, data, loss if impl != "ce" else None, modules[impl], device, amp)
        return make_step(data, loss if impl != "ce" else None, modules[impl], device)
    steps = [build(impl) for impl in impls]
    times = common.time_interleaved([s for s, _ in steps], device, repeat=repeat, stat=min)
    row = dict(loss=loss, **{f"{impl}_ms": t for impl, t in zip(impls, times)})
    for impl, (step, params) in zip(impls, steps) if peaks else ():
        for p in params:
            p.grad = None  # freed before the measured step, which then allocates every gradient
        row[f"{impl}_peak"], row[f"{impl}_grads"] = peak.measure(step, device, held=lambda: [p.grad for p in params])
    return row


def merge_kernel_sets(base_rows, next_rows):
    """base_rows with fused_next_ms: the next kernels' fused step, moved by the difference of the
    two processes' CE-only steps (the CE step runs no idd_ops code)."""
    by_loss = {r["loss"]: r for r in next_rows}
    out = []
    for row in base_rows:
        other = by_loss.get(row["loss"])
        extra = dict(fused_next_ms=other["fused_ms"] - other["ce_ms"] + row["ce_ms"]) if other else {}
        out.append(dict(row, **extra))
    return out


def table(rows):
    nxt = any("fused_next_ms" in r for r in rows)
    peaks = any("fused_peak" in r for r in rows)
    head = ["loss", "CE-only step ms", "step with fused ms"] + (["step with fused next ms"] if nxt else []) + \
        ["step with reference ms", "step: reference / fused", "fused loss ms"] + (["fused next loss ms"] if nxt else []) + \
        ["reference loss ms", "fused loss share"] + (["fused next loss share"] if nxt else []) + ["reference loss share"]
    head += ["CE-only peak MiB", "fused step peak MiB", "reference step peak MiB", "gradients MiB"] if peaks else []
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        ce, fused, ref, fnext = r["ce_ms"], r["fused_ms"], r["reference_ms"], r.get("fused_next_ms")
        cells = [r["loss"], f"{ce:.0f}", f"{fused:.0f}"] + ([f"{fnext:.0f}" if fnext else "-"] if nxt else [])
        cells += [f"{ref:.0f}", f"{ref / fused:.2f}x", f"{fused - ce:.1f}"]
        cells += [f"{fnext - ce:.1f}" if fnext else "-"] if nxt else []
        cells += [f"{ref - ce:.1f}", f"{(fused - ce) / fused:.1%}"]
        cells += [f"{(fnext - ce) / fnext:.1%}" if fnext else "-"] if nxt else []
        cells += [f"{(ref - ce) / ref:.1%}"]
        if peaks:
            cells += [f"{r[i + '_peak'] / 2**20:.0f}" + (" !" if r[i + "_peak"] < r[i + "_grads"] else "")
                      for i in STEP_IMPLS] + [f"{r['fused_grads'] / 2**20:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def real_network_available(device):
    """Whether the real-network step can run: a GPU device and torchvision importable."""
    if not torch.device(device).type == "cuda":
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def _child_argv(args, kernel_set, path):
    argv = ["--device", args.device, "--network", args.network, "--batch", str(args.batch), "--repeat", str(args.repeat),
            "--losses", *args.losses, "--rows-json", path] + (["--no-peak"] if args.no_peak else []) + \
        (["--system-malloc"] if args.system_malloc else [])
    return argv + ([] if kernel_set == args.kernels[0] else ["--impls", "ce", "fused"])


def describe(args, dev, allocator):
    if args.network == "deeplabv3":
        what = (f"One real training step: torchvision DeepLabV3-ResNet50 student, DeepLabV3-ResNet101 teacher (random "
                f"weights, eval mode, forward without gradient inside every step), B={args.batch}, images "
                f"3x{H * SCALE}x{W * SCALE}, {K} classes, bf16 autocast, SGD. Features for the losses: each backbone's "
                f"output (2048 channels at {H}x{W}, the classifier head's input); logits: the head's, at {H}x{W}, "
                f"upsampled for CE. ")
    else:
        what = (f"One training step at Cityscapes shapes: B={args.batch}, student features {C_S}x{H}x{W}, teacher "
                f"features {C_T}x{H}x{W}, logits {K}x{H}x{W} upsampled to labels {H * SCALE}x{W * SCALE} for CE "
                f"(benchmarks/train_step.py describes the head and each loss), float32. ")
    kernels = ""
    if args.kernels and len(args.kernels) > 1:
        kernels = (f"Fused next: IDD_OPS_CUDA_NEXT={common.KERNEL_SETS['next']}, in a second process (CE-only and "
                   "fused steps), its step moved by the difference of the two processes' CE-only steps. ")
    return (f"Revision: {common.revision()}. " + what + f"{args.device} ({dev}), torch {torch.__version__}, the best of {args.repeat} rounds, the steps of a "
            f"row alternating. Allocator: {allocator}. {kernels}Loss ms = step - CE-only step (noise can make it "
            f"negative); share = loss ms / step. " + (f"Peak memory: {peak.METHOD}; gradients MiB: the parameter "
                                                    f"gradients a fused step leaves, which no peak may be below ('!')."
                                                    if not args.no_peak else "Peak memory: not measured (--no-peak)."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES, help="losses to run (default: all)")
    ap.add_argument("--skip", nargs="+", default=(), choices=LOSSES, help="losses to leave out")
    ap.add_argument("--network", choices=("auto", "head", "deeplabv3"), default="auto",
                    help="deeplabv3: torchvision DeepLabV3-ResNet101 teacher / ResNet50 student, bf16 autocast; head: "
                         "the small head (float32); auto (default): deeplabv3 on a GPU with torchvision, else head")
    ap.add_argument("--batch", type=cli.positive_int, default=8)
    ap.add_argument("--repeat", type=cli.positive_int, default=5, help="timing rounds (default 5)")
    common.add_kernel_set_options(ap, "3:2", impls_default=list(STEP_IMPLS))
    ap.add_argument("--targets", action="store_true", help="check the training-step targets of benchmarks/targets.py")
    ap.add_argument("--summary", default=None, help="also write the table and the misses to this file")
    ap.add_argument("--device", type=cli.device, default="cpu")
    common.add_allocator_option(ap)
    ap.add_argument("--out", default=None, help="markdown file (default: results/bench-<date-time>/TRAIN_STEP.md)")
    ap.add_argument("--update", action="store_true",
                    help="write the committed benchmarks/TRAIN_STEP.md (TRAIN_STEP-cuda.md with --device cuda)")
    args = ap.parse_args(argv)
    allocator = common.apply_allocator_option(args)
    if args.network == "deeplabv3" and not real_network_available(args.device):
        ap.error("--network deeplabv3 needs a CUDA --device and torchvision importable")
    if args.network == "auto":
        args.network = "deeplabv3" if real_network_available(args.device) else "head"
    args.losses = [name for name in args.losses if name not in args.skip]
    if not args.losses:
        ap.error("no loss left to run (--skip leaves out every one of --losses)")
    cli.check_file_paths(ap, out=args.out, summary=args.summary)
    if args.rows_json:
        errors = []
        measure(args, progress=lambda rows: common.write_json(args.rows_json, dict(rows=rows, errors=errors)),
                errors=errors)
        return
    on_cuda = args.device.startswith("cuda")
    committed = "benchmarks/TRAIN_STEP-cuda.md" if on_cuda else "benchmarks/TRAIN_STEP.md"
    if args.update and args.out:
        ap.error(f"--update writes {committed}; leave out --out")
    if args.update and args.losses != list(LOSSES):
        ap.error("--update rewrites the whole committed table: run every loss (no --losses or --skip), or write a "
                 "subset with --out")
    out = committed if args.update else args.out or os.path.join(
        "results", time.strftime("bench-%Y%m%d-%H%M%S"), os.path.basename(committed))
    expected = f"{EXPECTED}; " if args.losses == list(LOSSES) and args.network == "head" else ""
    print(f"benchmarks.train_step: {args.network} network; {expected}writing {out}", file=sys.stderr, flush=True)
    errors, columns = [], ["fused"]
    if args.kernels:
        results, errors = common.run_per_kernel_set("benchmarks.train_step",
                                                    lambda ks, path: _child_argv(args, ks, path), args.kernels,
                                                    time_limit=args.time_limit, weights=[3, 2])
        errors += [f"{ks} kernels: {e}" for ks in args.kernels for e in (results.get(ks) or {}).get("errors", [])]
        base = results.get(args.kernels[0])
        if not base or not base["rows"]:
            sys.exit(f"the {args.kernels[0]} kernels' training step failed: {'; '.join(errors)}")
        rows = base["rows"]
        if len(args.kernels) > 1 and results.get(args.kernels[1]) is not None:
            rows, columns = merge_kernel_sets(rows, results[args.kernels[1]]["rows"]), ["fused", "fused_next"]
    else:
        rows = measure(args)
    dev = torch.cuda.get_device_name() if on_cuda else f"{torch.get_num_threads()} CPU threads"
    text = (f"Command: `{cli.command_line('benchmarks.train_step', argv)}`\n\n" + describe(args, dev, allocator)
            + "\n\n" + table(rows))
    print(text)
    with cli.open_for_writing(out) as f:
        f.write(text)
    print(f"written to {out}", file=sys.stderr)
    misses = targets.check_train(rows, columns) if args.targets else []
    if args.summary:
        with cli.open_for_writing(args.summary) as f:
            f.write(f"## train: {args.network} training step, each loss's cost per step\n\n" + table(rows)
                    + "".join(f"\n- ERROR: {e}" for e in errors)
                    + (f"\n\n### Training-step targets missed ({len(misses)})\n\n" if misses else "")
                    + "".join(f"- {m}\n" for m in misses))
    print("".join(f"MISSED {m}\n" for m in misses) + "".join(f"ERROR {e}\n" for e in errors))
    if misses or errors:
        sys.exit(f"{len(misses)} training-step targets missed, {len(errors)} errors")


def measure(args, progress=None, errors=None):
    """Every loss's row, for this process's kernel set; progress(rows) after each. errors: a list,
    to keep going past a loss that raises (its message appended); else the error propagates."""
    nets, amp = None, None
    if args.network == "deeplabv3":
        teacher, student = deeplabv3_pair()
        nets = (teacher.to(args.device).eval().requires_grad_(False), student.to(args.device).train())
        data, amp = make_real_data(args.batch, args.device), torch.bfloat16
    else:
        data = make_data(args.batch, args.device)
    rows, start = [], time.perf_counter()
    for i, loss in enumerate(args.losses):
        elapsed = time.perf_counter() - start
        left = f", about {elapsed / i * (len(args.losses) - i) / 60:.1f} min left" if i else ""
        print(f"[{i + 1}/{len(args.losses)}] {loss} ({elapsed / 60:.1f} min so far{left})", file=sys.stderr, flush=True)
        try:
            rows.append(measure_loss(loss, data, args.device, args.repeat, impls=args.impls, peaks=not args.no_peak,
                                     nets=nets, amp=amp))
        except Exception as error:  # noqa: BLE001 - reported; the other losses still measured
            if errors is None:
                raise
            errors.append(f"{loss}: {type(error).__name__}: {error}"[:500])
            traceback.print_exc()
        if progress:
            progress(rows)
    return rows


if __name__ == "__main__":
    main()
