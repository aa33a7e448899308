"""Small settings of the demo for tests (a preset, scenes and networks that train in seconds), and
the committed results they are held to."""
import dataclasses
import json
from pathlib import Path

import idd_ops
from idd_ops.demo import experiment
from idd_ops.demo.models import make_teacher
from idd_ops.demo.presets import PRESETS
from idd_ops.demo.scenes import CLASSES, StreetScenes

REPOSITORY = Path(__file__).resolve().parents[1]  # this checkout: README.md, the committed results/


def small_setup(**changes):
    """(preset, train set, teacher, read-out) small enough for a few student steps in a test."""
    preset = dataclasses.replace(PRESETS["quick"], size=(32, 64), batch=2, **changes)
    train = StreetScenes(4, seed=1, size=preset.size)
    teacher = make_teacher(len(CLASSES)).eval().requires_grad_(False)
    readout = idd_ops.nn.PositionEncodingModule(teacher.feature_channels, experiment.POSITION_KINDS, hidden=8)
    return preset, train, teacher, readout


def tiny_preset(**changes):
    """The quick preset shrunk to one seed, two configurations and single steps at 32x64."""
    base = dataclasses.replace(PRESETS["quick"], size=(32, 64), train_images=4, val_images=4, batch=2,
                               teacher_steps=1, student_steps=1, seeds=(0,), configs=("ce", "ce+pid"), probe_steps=1,
                               weights_from="")
    return dataclasses.replace(base, **changes)


def committed_json(folder, name):
    """The JSON file `name` of the committed results/`folder` (a fresh copy: tests change it)."""
    with open(REPOSITORY / "results" / folder / name) as f:
        return json.load(f)
