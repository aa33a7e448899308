"""The demo's data and measures: the street-scene generator, mIoU, the paired Student-t
interval and the networks' feature stride."""
import pytest
import torch
import torch.nn.functional as F

from idd_ops.demo.metrics import confusion_matrix, iou_per_class, mean_iou
from idd_ops.demo.models import FEATURE_LAYER, make_student, make_teacher
from idd_ops.demo.scenes import (BUILDING, CLASSES, CONFUSABLE, IGNORE_INDEX, OBJECTS, ROAD, SIDEWALK, SKY, THIN,
                                 StreetScenes, render_scene)


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


def test_confusable_classes_share_their_appearance():
    """Within a confusable group the classes' colours come from one distribution: across images,
    the mean colours of its members differ by much less than one image's colour varies."""
    means = {k: [] for k in range(len(CLASSES))}
    for i in range(40):
        image, label = render_scene(i, size=(64, 128))
        for k in means:
            if (label == k).sum() > 10:
                means[k].append(image[:, label == k].mean(1))
    for group, members in CONFUSABLE.items():
        seen = [torch.stack(means[k]) for k in members if len(means[k]) > 4]
        for a in seen[1:]:
            spread = torch.cat([seen[0], a]).std(0).mean()
            assert (a.mean(0) - seen[0].mean(0)).abs().max() < spread, group
            assert spread > 0.08, group


def test_every_class_occurs_and_thin_ones_reach_the_feature_stride():
    """All 19 classes appear in a few dozen scenes; near thin objects are as wide as the
    networks' stride (8 pixels) in some scene at the cpu preset's size, so they exist in the
    features too."""
    seen, widest = set(), {k: 0 for k in THIN}
    for i in range(60):
        _, label = render_scene(i, size=(64, 128))
        seen |= set(label.unique().tolist())
        for k in THIN:
            widest[k] = max(widest[k], int((label == k).sum(1).max()))
    assert set(range(len(CLASSES))) <= seen
    assert all(w >= 8 for w in widest.values()), widest


def test_scene_progress_comes_at_least_every_tenth():
    """Chunks of 50 scenes gave the quick preset's 200 training images a line every 25 %."""
    seen = []
    StreetScenes(20, seed=1, size=(8, 16), progress=lambda done, total: seen.append(done))
    assert seen == list(range(2, 21, 2))


def test_paired_interval_matches_student_t():
    from idd_ops.demo.stats import paired_difference, t_quantile

    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)
    mean, lo, hi, n = paired_difference([61.0, 62.5, 60.0, 63.0, 61.5], [60.0, 61.0, 59.5, 62.0, 60.0])
    diffs = torch.tensor([1.0, 1.5, 0.5, 1.0, 1.5], dtype=torch.float64)
    half = 2.7764 * diffs.std() / 5 ** 0.5
    assert n == 5 and mean == pytest.approx(1.1)
    assert (lo, hi) == pytest.approx((1.1 - half.item(), 1.1 + half.item()), abs=1e-3)
    assert paired_difference([1.0], [0.0])[1] != paired_difference([1.0], [0.0])[1]  # NaN: one pair


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
    for model in (make_teacher(8), make_student(8), make_student(8, padding_mode="zeros")):
        feats = {}
        model.get_submodule(FEATURE_LAYER).register_forward_hook(lambda m, i, o: feats.update(f=o))
        logits = model(torch.randn(2, 3, 64, 128))
        assert logits.shape == (2, 8, 8, 16) and feats["f"].shape[-2:] == (8, 16)
