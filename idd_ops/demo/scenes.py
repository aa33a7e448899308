"""Procedural street scenes with a Cityscapes-like layout, deterministic by (seed, index).

Classes are not separable by colour: every class of an image draws its colour and texture from
the same distribution. What tells them apart is shape, context and position (sky above the
horizon, road below it, cars on the road, people on the sidewalk, thin poles), so both
inter-class structure and position information matter for a segmentation network.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CLASSES = ("sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole")
SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, CAR, PERSON, POLE = range(len(CLASSES))
OBJECTS = (CAR, PERSON, POLE)
IGNORE_INDEX = 255


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _layout(g, H, W):
    """The label map [H, W] of one scene (before the ignored border band)."""
    rows = torch.arange(H)[:, None].expand(H, W)
    cols = torch.arange(W)[None, :].expand(H, W)
    label = torch.full((H, W), SKY)
    horizon = int(_uniform(g, 0.38, 0.55) * H)
    x = 0
    while x < W:  # a row of buildings (some gaps) standing on the horizon
        w = int(_uniform(g, 0.08, 0.3) * W) + 1
        top = int(_uniform(g, 0.05, 0.9) * horizon)
        cls = BUILDING if torch.rand((), generator=g) < 0.8 else VEGETATION
        label[top:horizon, x:x + w] = cls
        x += w
    for _ in range(int(_uniform(g, 1, 4))):  # tree crowns over the buildings
        cy, cx = _uniform(g, 0.5, 1.0) * horizon, _uniform(g, 0, W)
        ry, rx = _uniform(g, 0.08, 0.2) * H, _uniform(g, 0.04, 0.12) * W
        label[((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1] = VEGETATION
    # below the horizon: a road in perspective, sidewalks beside it, grass beyond
    depth = ((rows - horizon).clamp_min(0) / max(H - horizon, 1)).float()
    vanish = _uniform(g, 0.35, 0.65) * W
    road_half = 2 + depth * _uniform(g, 0.35, 0.6) * W
    walk = 1 + depth * _uniform(g, 0.1, 0.25) * W
    off = (cols - vanish).abs()
    ground = rows >= horizon
    label[ground] = VEGETATION
    label[ground & (off < road_half + walk)] = SIDEWALK
    label[ground & (off < road_half)] = ROAD
    # objects, far ones first so near ones occlude them
    objects = []
    for cls, n in ((CAR, int(_uniform(g, 0, 5))), (PERSON, int(_uniform(g, 0, 6))), (POLE, int(_uniform(g, 0, 4)))):
        for _ in range(n):
            objects.append((_uniform(g, horizon + 3, H), cls))
    for bottom, cls in sorted(objects):
        scale = (bottom - horizon) / max(H - horizon, 1)
        side = 1 if torch.rand((), generator=g) < 0.5 else -1
        half_road = 2 + scale * 0.45 * W
        if cls == CAR:
            h = 3 + scale * 0.3 * H
            w = h * _uniform(g, 1.4, 2.4)
            cx = vanish + side * _uniform(g, 0, 0.8) * half_road
        elif cls == PERSON:
            h = 4 + scale * 0.4 * H
            w = max(1.5, h * 0.3)
            cx = vanish + side * (half_road + _uniform(g, 0.1, 1.0) * (1 + scale * 0.2 * W))
        else:
            h = 8 + scale * 0.8 * H
            w = max(1.0, 1 + scale * 0.015 * W)
            cx = vanish + side * (half_road + _uniform(g, 0, 1) * (1 + scale * 0.2 * W))
        box = (rows < bottom) & (rows >= bottom - h) & ((cols - cx).abs() < w / 2)
        label[box] = cls
    return label, horizon


def _ignore_border(label):
    """Ignore (255) the one-pixel band of background around every object, as real annotations
    leave uncertain borders; the objects themselves (even one pixel wide poles) stay labelled."""
    lab = label[None, None].float()
    differs = (F.max_pool2d(lab, 3, 1, 1) != F.max_pool2d(-lab, 3, 1, 1).neg())[0, 0]  # any neighbour differs
    is_obj = torch.zeros_like(label, dtype=torch.bool)
    for cls in OBJECTS:
        is_obj |= label == cls
    near_obj = F.max_pool2d(is_obj[None, None].float(), 3, 1, 1)[0, 0] > 0
    out = label.clone()
    out[differs & near_obj & ~is_obj] = IGNORE_INDEX
    return out


def _texture(g, H, W):
    """One of a few texture kinds, shared by all classes: flat, stripes either way, or noise."""
    kind = int(_uniform(g, 0, 4))
    rows = torch.arange(H, dtype=torch.float32)[:, None]
    cols = torch.arange(W, dtype=torch.float32)[None, :]
    freq = _uniform(g, 0.2, 1.2)
    if kind == 0:
        return torch.zeros(H, W)
    if kind == 1:
        return 0.12 * torch.sin(freq * rows + _uniform(g, 0, 6)).expand(H, W)
    if kind == 2:
        return 0.12 * torch.sin(freq * cols + _uniform(g, 0, 6)).expand(H, W)
    return 0.15 * (torch.rand(H, W, generator=g) - 0.5)


def render_scene(index, seed=0, size=(128, 256)):
    """Scene `index` of the set drawn with `seed`: ``(image [3, H, W] float in [0, 1],
    label [H, W] int64 with IGNORE_INDEX on object borders)``."""
    H, W = size
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    label, horizon = _layout(g, H, W)
    image = torch.zeros(3, H, W)
    for cls in range(len(CLASSES)):
        mask = label == cls
        if not mask.any():
            continue
        colour = 0.15 + 0.7 * torch.rand(3, 1, 1, generator=g)  # the same distribution for every class
        image = torch.where(mask, colour + _texture(g, H, W), image)
    # lighting: a brightness ramp in a random direction, then noise and, sometimes, blur
    angle = _uniform(g, 0, 2 * math.pi)
    ramp = (math.cos(angle) * torch.linspace(-1, 1, W)[None, :] + math.sin(angle) * torch.linspace(-1, 1, H)[:, None])
    image = image * (_uniform(g, 0.7, 1.2) + 0.25 * ramp)
    image = image + _uniform(g, 0.02, 0.08) * torch.randn(3, H, W, generator=g)
    if torch.rand((), generator=g) < 0.5:
        image = F.avg_pool2d(image[None], 3, 1, 1, count_include_pad=False)[0]
    return image.clamp(0, 1), _ignore_border(label)


class StreetScenes(Dataset):
    """A fixed-size set of generated scenes, rendered once and kept in memory (uint8 images).

    Args:
        num_images: how many scenes. seed: which set (train and validation use different
            seeds). size: (H, W), default (128, 256). progress: a callable(done, total) or None.

    Items: ``(image [3, H, W] float32 in [0, 1], label [H, W] int64)``.
    """

    def __init__(self, num_images, seed=0, size=(128, 256), progress=None):
        self.size = tuple(size)
        images, labels = [], []
        for i in range(num_images):
            img, lab = render_scene(i, seed, self.size)
            images.append((img * 255).round().to(torch.uint8))
            labels.append(lab.to(torch.uint8))
            if progress is not None:
                progress(i + 1, num_images)
        self.images = torch.stack(images) if images else torch.empty(0, 3, *self.size, dtype=torch.uint8)
        self.labels = torch.stack(labels) if labels else torch.empty(0, *self.size, dtype=torch.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 255, self.labels[i].long()
