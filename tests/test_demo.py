"""The end-to-end demo: scene generator, metrics, and one training step of every configuration."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import idd_ops
from idd_ops.demo import experiment
from idd_ops.demo.metrics import confusion_matrix, iou_per_class, mean_iou
from idd_ops.demo.models import FEATURE_LAYER, make_student, make_teacher
from idd_ops.demo.scenes import (BUILDING, CLASSES, IGNORE_INDEX, OBJECTS, ROAD, SIDEWALK, SKY, StreetScenes,
                                 render_scene)


def test_generator_is_deterministic():
    a, b = render_scene(3, seed=5, size=(48, 96)), render_scene(3, seed=5, size=(48, 96))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = render_scene(4, seed=5, size=(48, 96))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("index", range(6))
def test_labels_are_consistent(index):
    image, label = render_scene(index, size=(64, 128))
    assert image.shape == (3, 64, 128) and 0 <= image.min() and image.max() <= 1
    values = set(label.unique().tolist())
    assert values <= set(range(len(CLASSES))) | {IGNORE_INDEX}
    top, bottom = set(label[0].tolist()), set(label[-1].tolist())
    assert not top & {ROAD, SIDEWALK} and not bottom & {SKY, BUILDING}  # position carries meaning
    # ignored pixels are background on object borders: an object pixel in their 3x3 neighbourhood
    ignored = label == IGNORE_INDEX
    obj = torch.zeros_like(ignored)
    for cls in OBJECTS:
        obj |= label == cls
    near = F.max_pool2d(obj[None, None].float(), 3, 1, 1)[0, 0] > 0
    assert not (ignored & ~near).any()
    assert obj.any() or not ignored.any()


def test_colour_alone_does_not_separate_classes():
    """Per-image class colours come from one distribution: across images, the mean colour of a
    class varies about as much as the overall colour does."""
    means = {k: [] for k in range(len(CLASSES))}
    for i in range(24):
        image, label = render_scene(i, size=(48, 96))
        for k in means:
            if (label == k).sum() > 20:
                means[k].append(image[:, label == k].mean(1))
    spreads = [torch.stack(v).std(0).mean().item() for v in means.values() if len(v) > 4]
    assert min(spreads) > 0.08


def test_miou_hand_computed():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    conf = confusion_matrix(pred, label, 4)
    # class 0: tp 1, fp 1 (pixel (1,1)), fn 1 (pixel (0,1)) -> 1/3; class 1: tp 3, fp 1 -> 3/4;
    # class 2: tp 1, fn 1 -> 1/2; class 3: absent everywhere -> left out
    iou = iou_per_class(conf)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert torch.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_models_expose_features_at_output_stride_8():
    for model in (make_teacher(8), make_student(8)):
        feats = {}
        model.get_submodule(FEATURE_LAYER).register_forward_hook(lambda m, i, o: feats.update(f=o))
        logits = model(torch.randn(2, 3, 64, 128))
        assert logits.shape == (2, 8, 8, 16) and feats["f"].shape[-2:] == (8, 16)


@pytest.mark.parametrize("config", list(experiment.CONFIGS))
def test_one_training_step_per_configuration(config):
    preset = dataclasses.replace(experiment.PRESETS["quick"], size=(32, 64), batch=2)
    train = StreetScenes(4, seed=1, size=preset.size)
    teacher = make_teacher(len(CLASSES)).eval().requires_grad_(False)
    readout = idd_ops.nn.PositionEncodingModule(teacher.feature_channels, experiment.POSITION_KINDS, hidden=8)
    student, curves, _ = experiment.train_student(preset, config, 0, train, teacher, readout, "cpu", steps=1)
    assert set(curves) == {"ce", *experiment.CONFIGS[config]}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in curves.values())
