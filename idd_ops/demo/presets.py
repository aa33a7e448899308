"""The experiment's settings: the loss configurations and their weights, the presets (image
size, data, schedules, seeds), and how command-line weights and a tuning's choice override them."""
import dataclasses
import json

# configuration -> loss weights (METHOD.md section 6: CE + 10 * pixel KD + l_idd * IDD + l_pid * PID).
# IDD, PID and CWD: the tuning's choice on the tune split at 64x128 (results/cpu-tune/tune.json, three
# paired seeds: the best mean paired difference to CE was idd at 1 of 0.3/1/3, pid at 0.1 of
# 0.1/0.3/1/3, none of them resolved, cwd at 30 of 0.3/1/3/10/30/100; a test holds CONFIGS to that
# file); KD, SKD and IFVD: their papers'.
# A preset at another size carries its own tuning's choice in its `weights`.
CONFIGS = {
    "ce": {},
    "ce+kd": {"kd": 10.0},
    "ce+idd": {"idd": 1.0},
    "ce+pid": {"pid": 0.1},
    "ce+kd+idd+pid": {"kd": 10.0, "idd": 1.0, "pid": 0.1},
    "ce+skd": {"skd": 1.0},
    "ce+ifvd": {"ifvd": 1.0},
    "ce+cwd": {"cwd": 30.0},
}

# the distillation losses whose weights --weight and the tuner's --grid set: each has a
# configuration ce+LOSS of its own
LOSSES = tuple(c[3:] for c, weights in CONFIGS.items() if list(weights) == [c[3:]])


def parse_loss_weights(items, option, several=False):
    """Reads command-line items LOSS=VALUE (several=True: LOSS=V1,V2,...) into {loss: weight}
    (several: {loss: [weights]}). Each LOSS one of LOSSES, given once; each weight finite, >= 0
    and, in a list, given once. Raises ValueError naming `option` and the item."""
    form = "LOSS=V1,V2,..." if several else "LOSS=VALUE"
    parsed = {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            weights = [float(v) for v in text.split(",")] if several else [float(text)]
        except ValueError:
            weights = []
        # one loss a name: ce+kd+idd+pid would train its default weights at every tuning point
        if name not in LOSSES or not weights or not all(0 <= w < float("inf") for w in weights):
            raise ValueError(f"{option}: expected {form} with LOSS one of {', '.join(LOSSES)} and finite weights "
                             f">= 0; got {item!r}")
        if name in parsed:
            raise ValueError(f"{option}: {name} is given twice; give each loss once"
                             + (", with all its weights" if several else ""))
        if len(set(weights)) < len(weights):
            raise ValueError(f"{option}: {item!r} names a weight twice")
        parsed[name] = weights if several else weights[0]
    return parsed


@dataclasses.dataclass
class Preset:
    size: tuple = (128, 256)
    train_images: int = 2000
    val_images: int = 200
    batch: int = 8
    teacher_steps: int = 3000
    student_steps: int = 1500
    seeds: tuple = (0, 1, 2)
    configs: tuple = tuple(CONFIGS)
    lr: float = 2e-3
    probe_steps: int = 300
    idd_normalize: str = "mean"
    weights: dict = dataclasses.field(default_factory=dict)  # loss name -> weight, overriding CONFIGS
    eval_split: str = "val"  # "val" for the reported tables, "tune" for the loss-weight tuning
    weights_from: str = ""  # where `weights` come from, for the record (not part of any cache key)
    smoke: bool = False  # too short to resolve effects: results.md says so (not part of any cache key)


TUNED_64x128 = "IDD, PID and CWD weights tuned on the tune split at 64x128 (results/cpu-tune/tune.md)"
PRESETS = {
    # the README's main job, sized to run in a few minutes on 2 CPU cores (see the README for the
    # measured time): short schedules, batch 4, three configurations, two seeds
    "quick": Preset(size=(64, 128), train_images=200, val_images=64, batch=4, teacher_steps=250, student_steps=100,
                    seeds=(0, 1), configs=("ce", "ce+idd", "ce+kd+idd+pid"), probe_steps=100, smoke=True,
                    weights_from=TUNED_64x128),
    # every configuration, 5 paired seeds, at 64x128 (see the README for measured times)
    "cpu": Preset(size=(64, 128), train_images=1000, val_images=160, teacher_steps=2000, student_steps=500,
                  seeds=(0, 1, 2, 3, 4), probe_steps=200, weights_from=TUNED_64x128),
    # full resolution (128x256), 5 paired seeds: for a GPU. On an H200 the whole preset took 3.1
    # min (16 runs side by side; results/full), on 2 CPU cores 146 min. Its weights: the tuning at
    # its size (a test holds them to results/full-tune/tune.json)
    "full": Preset(seeds=(0, 1, 2, 3, 4), student_steps=600, weights={"idd": 3.0, "pid": 1.0, "cwd": 30.0},
                   weights_from="IDD, PID and CWD weights tuned on the tune split at 128x256 "
                                "(results/full-tune/tune.md)"),
}


def read_tuning(path, size):
    """(weights {loss: weight}, a sentence saying where they come from) from a tune.json that
    `python -m idd_ops.demo.tune` wrote; ValueError where it is not one, or was tuned at images of
    another size than `size` (height, width)."""
    try:
        with open(path) as f:
            tuning = json.load(f)
        chosen, tuned_size = tuning["chosen"], tuple(tuning["preset"]["size"])
        if not all(k in LOSSES and isinstance(w, (int, float)) for k, w in chosen.items()):
            raise TypeError(f"chosen weights {chosen!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a tune.json of python -m idd_ops.demo.tune "
                         f"({type(error).__name__}: {error})") from None
    shown = "x".join(map(str, size))
    if tuned_size != tuple(size):
        raise ValueError(f"{path} was tuned at {'x'.join(map(str, tuned_size))}; this run's images are {shown}")
    return chosen, f"IDD, PID and CWD weights tuned on the tune split at {shown} ({path}): {chosen}"


def config_weights(config, overrides):
    """The loss weights of a configuration: CONFIGS[config] with `overrides` (loss -> weight)
    applied to the losses it uses."""
    return {k: overrides.get(k, w) for k, w in CONFIGS[config].items()}


def run_label(config, seed, overrides):
    """A run's name in progress lines: "<config> seed <seed>", then the weights `overrides` sets
    for this configuration's losses (the tuning's runs of one configuration differ only there)."""
    shown = "".join(f", {k} weight {w:g}" for k, w in overrides.items() if k in CONFIGS[config])
    return f"{config} seed {seed}{shown}"
