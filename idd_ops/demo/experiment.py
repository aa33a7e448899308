"""The distillation experiment: train a teacher, then students under each loss configuration
and several seeds, evaluate mIoU, probe position information, and measure the teacher-student
gap in inter-class distances. Every long loop shows progress; the teacher and every finished
student run are cached in the output folder under a key of every setting that changes their
result, so an interrupted experiment resumes where it stopped and a changed setting reruns."""
import copy
import dataclasses
import glob
import hashlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import idd_ops
from idd_ops import reference
from idd_ops.distiller import Distiller, FeatureHook

from .metrics import confusion_matrix, iou_per_class, mean_iou
from .models import FEATURE_LAYER, make_student, make_teacher
from .presets import config_weights, run_label
from .progress import Progress
from .scenes import CLASSES, IGNORE_INDEX, StreetScenes
from .teacher_cache import CachedTeacher
from .workers import Workers

POSITION_KINDS = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")

# Bump when a code change alters results, so that runs cached by older code are not reused.
# 4: IDD's K x K math in float64 (docs/METHOD.md 8), and each CPU run's thread count in its key.
CACHE_VERSION = 4
# seeds of the generated image sets; the tune split exists only for the loss-weight tuning
SPLIT_SEEDS = {"train": 1, "val": 2, "tune": 3}


def _digest(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_key(preset, device):
    """Every setting that changes the trained teacher; on the CPU that includes the torch threads
    it trains on (this process's: the order of parallel reductions follows them, as in run_key)."""
    return dict(version=CACHE_VERSION, size=list(preset.size), train_images=preset.train_images, batch=preset.batch,
                teacher_steps=preset.teacher_steps, lr=preset.lr, device=str(device), seed=0,
                threads=torch.get_num_threads() if torch.device(device).type == "cpu" else None)


def model_digest(model):
    """Identity of a trained model: a hash of its parameters and buffers."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def run_key(preset, config, seed, teacher_id, device, threads=None):
    """Every setting that changes a student run's result: the preset (image size, data, batch,
    steps, learning rate, probe and IDD options), the configuration's effective loss weights,
    the seed, the teacher's identity, the device and, on the CPU, the torch threads the run
    computed on (the order of parallel reductions follows it)."""
    ignored = ("configs", "seeds", "weights", "weights_from", "smoke", "teacher_steps")  # teacher_steps: in teacher_id
    settings = {k: v for k, v in dataclasses.asdict(preset).items() if k not in ignored}
    return dict(settings, version=CACHE_VERSION, config=config, weights=config_weights(config, preset.weights),
                seed=seed, teacher=teacher_id, device=str(device),
                threads=threads if torch.device(device).type == "cpu" else None)


def batches(data, batch, steps, seed, device):
    """`steps` random batches (with replacement across epochs), deterministic by seed:
    (image indices, images, labels)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(steps * batch // len(data) + 1)])
    for s in range(steps):
        idx = order[s * batch:(s + 1) * batch]
        yield idx, data.images[idx].to(device).float() / 255, data.labels[idx].to(device).long()


def seg_loss(logits, labels):
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX)


def poly_lr(opt, base, step, total):
    for group in opt.param_groups:
        group["lr"] = base * (1 - step / total) ** 0.9


def _values(losses):
    """Python floats of a run's per-step losses, read in one transfer at its end: reading each
    step's loss (`.item()`) would make the host wait for the GPU every step, where the small
    networks' steps are launch-bound and the host should run ahead."""
    return torch.stack(losses).tolist() if losses else []


def train_teacher(preset, train, device, seed=0):
    torch.manual_seed(seed)
    model = make_teacher(len(CLASSES)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=preset.lr)
    bar, curve = Progress(preset.teacher_steps, "teacher"), []
    model.train()
    for step, (_, x, y) in enumerate(batches(train, preset.batch, preset.teacher_steps, seed, device)):
        poly_lr(opt, preset.lr, step, preset.teacher_steps)
        loss = seg_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.detach())
        bar.update(loss=curve[-1])
    return model.eval(), _values(curve)


def train_student(preset, config, seed, train, teacher, readout, device, lib=idd_ops, steps=None, label=None):
    """Returns (student, curves: {loss name: [values]}, seconds per step). `lib` is idd_ops, or
    idd_ops.reference for the timing comparison. `teacher` may be a CachedTeacher of `train`.
    label: the progress line's (default: run_label's)."""
    torch.manual_seed(seed)
    student = make_student(len(CLASSES)).to(device)
    weights = config_weights(config, preset.weights)
    cs, ct = student.feature_channels, teacher.feature_channels
    pid = idd_ops.nn.PositionDistillationLoss(readout, cs, ct).to(device) if "pid" in weights else None
    # normalizer: the committed results were made with the mean over the teacher's channels
    cwd = (idd_ops.nn.ChannelWiseDistillationLoss(cs, ct, normalizer="teacher_channels").to(device)
           if "cwd" in weights else None)
    distiller = Distiller(teacher, student, teacher_layer=FEATURE_LAYER, student_layer=FEATURE_LAYER,
                          num_classes=len(CLASSES), ignore_index=IGNORE_INDEX, weights=weights,
                          pid=pid, cwd=cwd, idd_options={"normalize": preset.idd_normalize}, lib=lib)
    opt = torch.optim.Adam([p for p in distiller.parameters() if p.requires_grad], lr=preset.lr)
    steps = steps or preset.student_steps
    curves, bar = {}, Progress(steps, label or run_label(config, seed, preset.weights))
    distiller.train()
    start = time.perf_counter()
    for step, (idx, x, y) in enumerate(batches(train, preset.batch, steps, 1000 + seed, device)):
        if isinstance(teacher, CachedTeacher):
            teacher.select(idx.to(device))
        poly_lr(opt, preset.lr, step, steps)
        logits_s, losses = distiller(x, y)
        parts = {"ce": seg_loss(logits_s, y), **{k: v for k, v in losses.items() if k != "total"}}
        total = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        for k, v in parts.items():
            curves.setdefault(k, []).append(v.detach())
        bar.update(loss=total.detach())
    curves = {k: _values(v) for k, v in curves.items()}
    seconds = (time.perf_counter() - start) / steps
    distiller.remove_hooks()
    return student.eval(), curves, seconds


@torch.no_grad()
def evaluate(model, val, device, batch=16):
    conf = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    for i in range(0, len(val), batch):
        x = val.images[i:i + batch].to(device).float() / 255
        y = val.labels[i:i + batch].long()
        logits = F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1).cpu(), y, len(CLASSES), IGNORE_INDEX)
    return mean_iou(conf), iou_per_class(conf).tolist()


def feature_fn(model):
    hook = FeatureHook(model, FEATURE_LAYER)

    def run(x):
        model(x)
        return hook.pop()
    return run, hook


def probe(model, val, device, preset):
    """Position information of a network: the probe's final error on its frozen features. Seeded,
    so that a cached teacher gives the same read-out (and PID target) as a freshly trained one."""
    torch.manual_seed(0)
    fn, hook = feature_fn(model.eval())
    xs = [val.images[i:i + preset.batch].to(device).float() / 255 for i in range(0, len(val), preset.batch)]
    readout, err = idd_ops.probe_position_information(fn, xs, POSITION_KINDS, steps=preset.probe_steps, hidden=32,
                                                       progress=False)
    hook.remove()
    return readout, err


@torch.no_grad()
def distance_gap(student, teacher, val, device, preset):
    """Mean IDD loss (normalised distances) between a student and the teacher over the val set."""
    fs_fn, hs = feature_fn(student)
    ft_fn, ht = feature_fn(teacher)
    total, n = 0.0, 0
    for i in range(0, len(val), preset.batch):
        x = val.images[i:i + preset.batch].to(device).float() / 255
        y = val.labels[i:i + preset.batch].to(device).long()
        total += idd_ops.inter_class_distance_loss(fs_fn(x), ft_fn(x), y, len(CLASSES), IGNORE_INDEX,
                                                   normalize="mean").item()
        n += 1
    hs.remove(), ht.remove()
    return total / max(n, 1)


def step_time(preset, config, train, teacher, readout, device, steps=10, warmup=2, rounds=3):
    """Seconds per student training step with fused losses and with the reference losses: the
    median over `rounds` rounds, each timing `steps` steps of one then of the other, after `warmup`
    untimed steps of both (the first steps of a process pay for its allocator's and the libraries'
    first calls, which the fused losses, timed first, paid alone; alternating rounds spread a
    drifting load over both)."""
    libs = (("fused", idd_ops), ("reference", reference))
    for name, lib in libs:
        train_student(preset, config, 0, train, teacher, readout, device, lib, steps=warmup,
                      label=f"warm-up, {config} with the {name} losses")
    times = {name: [] for name, _ in libs}
    for r in range(rounds):
        for name, lib in libs:
            times[name].append(train_student(preset, config, 0, train, teacher, readout, device, lib, steps=steps,
                                             label=f"time per step, round {r + 1}/{rounds}, {config} with the "
                                                   f"{name} losses")[2])
    return {**{name: statistics.median(t) for name, t in times.items()}, "rounds": times,
            "steps": steps, "warmup_steps": warmup}


def save_piece(obj, path):
    """torch.save of a cache piece, whole or not at all: written beside `path`, then renamed over
    it, so that a run stopped midway (a time limit's signal) leaves no truncated piece for the
    next call to fail on."""
    part = f"{path}.part-{os.getpid()}"
    try:
        torch.save(obj, part)
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def load_teacher(path, device="cpu"):
    """(teacher network, the checkpoint's dict) from a teacher.pt that idd-distill wrote; a
    ValueError naming the file for anything else (a student's run, results.json)."""
    expected = "expected a teacher.pt written by idd-distill"
    try:
        state = torch.load(path, map_location=device)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a checkpoint torch can read ({type(error).__name__}); {expected}") from None
    if not isinstance(state, dict) or not {"model", "curve"} <= state.keys() or "miou" in state:
        raise ValueError(f"{path}: not a teacher checkpoint; {expected}")
    teacher = make_teacher(len(CLASSES)).to(device)
    try:
        teacher.load_state_dict(state["model"])
    except RuntimeError:
        raise ValueError(f"{path}: its weights do not fit the teacher network; {expected}") from None
    return teacher, state


def load_or_train_teacher(preset, train, device, out, checkpoint=None):
    """The teacher from `checkpoint` (used as given), from `out`/teacher.pt when it was trained
    with the same settings, or trained now. Returns (teacher, curve, seconds it took to train,
    whether it came from a file)."""
    key = teacher_key(preset, device)
    path = checkpoint or os.path.join(out, "teacher.pt")
    if os.path.exists(path):
        try:
            teacher, state = load_teacher(path, device)
        except ValueError:
            if checkpoint:
                raise
            state = {}  # a cached teacher of another network: trained again below
        if checkpoint or state.get("key") == key:
            print(f"cache: using the teacher in {path}" + ("" if checkpoint else " (same settings)"), file=sys.stderr)
            return teacher.eval(), state["curve"], state.get("seconds", 0.0), True
        print(f"cache: {path} was trained with other settings; training a new teacher", file=sys.stderr)
    start = time.perf_counter()
    teacher, curve = train_teacher(preset, train, device)
    seconds = time.perf_counter() - start
    save_piece({"model": teacher.state_dict(), "curve": curve, "key": key, "seconds": seconds}, path)
    return teacher, curve, seconds, False


def student_run(preset, config, seed, train, val, teacher, readout, device, teacher_outputs=None):
    """Trains and measures one student: mIoU, per-class IoU, loss curves, time per step, IDD
    gap to the teacher, and the position-probe error of its features. teacher_outputs: a
    CachedTeacher of `train` to train with instead of running the teacher."""
    start = time.perf_counter()
    student, curves, sec = train_student(preset, config, seed, train, teacher_outputs or teacher, readout, device)
    miou, iou = evaluate(student, val, device)
    run = dict(miou=miou, iou=iou, curves=curves, weights=config_weights(config, preset.weights),
               seconds_per_step=sec, distance_gap=distance_gap(student, teacher, val, device, preset),
               position_error=probe(student, val, device, preset)[1], model=student.state_dict())
    run["seconds"] = time.perf_counter() - start
    return run


def make_data(preset, map=None):
    """(train set, evaluation set: the preset's eval_split), rendered with progress bars.
    map: e.g. Workers.map, to render chunks of scenes in parallel (the same scenes)."""
    sets = []
    for n, split, name in ((preset.train_images, "train", "train set"),
                           (preset.val_images, preset.eval_split, f"{preset.eval_split} set")):
        bar = Progress(n, name)
        sets.append(StreetScenes(n, seed=SPLIT_SEEDS[split], size=preset.size, map=map,
                                 progress=lambda done, total, bar=bar: bar.update(done - bar.done)))
    return tuple(sets)


_shared = {}  # per process: the latest shared context of run_students, on its device


def _student_piece(context_path, preset, config, seed, key, path, side_by_side=1):
    """One student run (in a worker or in this process): written to `path` and returned, its
    weights on the CPU (a CUDA tensor sent between processes lives only as long as its sender).
    side_by_side: how many runs train at once, itself included; kept for the wall time of a
    later call that takes this run from the cache."""
    if _shared.get("path") != context_path:
        # memory-mapped: the workers share the file's pages, and no /dev/shm (small in containers)
        context = torch.load(context_path, mmap=True, weights_only=False)
        device = context["device"]
        _shared.clear()
        _shared.update(context, path=context_path, teacher=context["teacher"].to(device),
                       readout=context["readout"].to(device),
                       outputs=CachedTeacher(*(t.to(device) for t in context["tables"]), FEATURE_LAYER))
    c = _shared
    run = student_run(preset, config, seed, c["train"], c["val"], c["teacher"], c["readout"], c["device"],
                      c["outputs"])
    run["model"] = {k: v.detach().cpu() for k, v in run["model"].items()}
    run["key"], run["side_by_side"] = key, side_by_side
    save_piece(run, path)
    return run


def run_students(jobs, train, val, teacher, readout, out, device, workers):
    """Every job (preset, configuration, seed) from its cache piece in `out`/runs when one with the
    same settings exists, else trained on `workers` (a Workers pool). Returns (runs in job order,
    the jobs that came from the cache, the wall time those took when they were computed: a run
    counts its seconds divided by the number of runs that trained beside it)."""
    # the read-out (PID's target) is trained in this process, whose thread setting no key holds
    teacher_id = f"{model_digest(teacher)}-{model_digest(readout)}"
    runs, todo, cached, cached_seconds = [None] * len(jobs), [], [], 0.0
    for i, (preset, config, seed) in enumerate(jobs):
        key = run_key(preset, config, seed, teacher_id, device, workers.threads)
        path = os.path.join(out, "runs", f"{config}_seed{seed}_{_digest(key)}.pt")
        run = torch.load(path, map_location=device) if os.path.exists(path) else None
        if run is None and glob.glob(os.path.join(out, "runs", f"{glob.escape(config)}_seed{seed}_*.pt")):
            print(f"cache: the pieces of {config} seed {seed} in {out}/runs/ were computed with other settings "
                  f"(another weight, schedule, version, device, thread count or teacher); training it", file=sys.stderr)
        if run is not None and run.get("key") == key:
            print(f"cache: using {path} (same settings; delete it to rerun)", file=sys.stderr)
            runs[i] = run
            cached.append(i)
            cached_seconds += run["seconds"] / run.get("side_by_side", 1)
        else:
            todo.append((i, preset, config, seed, key, path))
    if todo:
        preset = todo[0][1]
        with workers.piece_threads():  # the tables every run reads, on the runs' threads
            outputs = CachedTeacher.compute(teacher, train, FEATURE_LAYER, 2 * preset.batch, device)
        # what every run reads: written once, on the CPU; each process moves it to `device` once
        context_path = os.path.join(out, "runs", f"shared-{os.getpid()}-{time.time_ns()}.pt")
        torch.save(dict(device=str(device), train=train, val=val, teacher=copy.deepcopy(teacher).cpu(),
                        readout=copy.deepcopy(readout).cpu(), tables=tuple(t.cpu() for t in outputs.tables())),
                   context_path)
        del outputs
        try:
            side_by_side = min(workers.size, len(todo))
            done = workers.map(_student_piece, [(context_path, *job[1:], side_by_side) for job in todo])
            for (i, *_), run in zip(todo, done):
                runs[i] = run
        finally:
            _shared.clear()
            os.remove(context_path)
    return runs, cached, cached_seconds


def setup_teacher(preset, out, device, train, val, teacher_checkpoint=None):
    """The teacher (loaded or trained), its evaluation on `val` and its position read-out (the PID
    target). Returns (results dict with the teacher's entries, teacher, read-out, seconds the cached
    teacher took when it was trained)."""
    teacher, teacher_curve, teacher_seconds, teacher_cached = load_or_train_teacher(
        preset, train, device, out, teacher_checkpoint)
    teacher.requires_grad_(False)
    results = {"preset": dataclasses.asdict(preset), "device": str(device), "classes": CLASSES,
               "teacher_id": model_digest(teacher),
               "cached": [f"teacher (--teacher {teacher_checkpoint})" if teacher_checkpoint else "teacher"]
               if teacher_cached else []}
    results["teacher"] = dict(zip(("miou", "iou"), evaluate(teacher, val, device)))
    readout, results["teacher"]["position_error"] = probe(teacher, val, device, preset)
    results["teacher"]["curve"] = teacher_curve
    return results, teacher, readout, teacher_seconds if teacher_cached else 0.0


def run_experiment(preset, out, device="cpu", teacher_checkpoint=None, command="", data=None, workers=None,
                   threads=None):
    """Runs everything and writes `out`/results.json (and checkpoints); returns
    (results dict, teacher, {(config, seed): run}, validation set).
    teacher_checkpoint: a teacher.pt of an earlier run at the same size, used instead of training.
    data: (train, evaluation) sets from make_data(preset), to share them between calls.
    workers, threads: the pool of worker processes for scenes and student runs (see
    workers.plan; default: automatic).
    results["seconds"] is the experiment's wall time: this call's plus the time the cached
    teacher and runs took when they were computed."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    t0 = time.perf_counter()
    with Workers(device, workers, threads) as pool:
        train, val = data or make_data(preset, pool.map)
        results, teacher, readout, cached_seconds = setup_teacher(preset, out, device, train, val, teacher_checkpoint)
        jobs = [(preset, config, seed) for config in preset.configs for seed in preset.seeds]
        found, cached, seconds = run_students(jobs, train, val, teacher, readout, out, device, pool)
    runs = {(config, seed): run for (_, config, seed), run in zip(jobs, found)}
    results.update(command=command, workers=pool.size, threads_per_worker=pool.threads)
    results["runs"] = {f"{c}|{s}": {k: v for k, v in r.items() if k not in ("model", "key")}
                       for (c, s), r in runs.items()}
    if "ce+kd+idd+pid" in preset.configs:
        results["step_time"] = step_time(preset, "ce+kd+idd+pid", train, teacher, readout, device)
    results["seconds_this_call"] = time.perf_counter() - t0
    results["seconds"] = results["seconds_this_call"] + cached_seconds + seconds
    results["cached"] += [f"{jobs[i][1]}|{jobs[i][2]}" for i in cached]
    if cached:
        print(f"cache: {len(cached)} of {len(runs)} student runs came from {out}/runs/", file=sys.stderr)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results, teacher, runs, val
