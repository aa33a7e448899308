"""Procedural street scenes with the 19 Cityscapes classes and their layout, deterministic by
(seed, index).

Appearance is shared within groups of confusable classes: road and sidewalk, building/wall/
fence, vegetation and terrain, person and rider, the six vehicles, pole/traffic light/traffic
sign each draw their colours from one distribution, and neighbouring groups' distributions
overlap. What tells a class from its confusable neighbours is context, shape and position: the
sidewalk beside the road, terrain on the ground and vegetation above it, a rider on a bicycle or
motorcycle and a person on the sidewalk, a bus long and tall, a truck boxy, a train at the
horizon, a traffic light or sign on top of a pole. Thin classes (poles, signs, lights, bicycles)
are a few pixels wide, near ones as wide as the networks' feature stride at the presets' sizes.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .workers import serial_map

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS,
 TRAIN, MOTORCYCLE, BICYCLE) = range(len(CLASSES))
# countable objects: their borders are ignored (255) in the labels, as annotations leave them
OBJECTS = (POLE, LIGHT, SIGN, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE)
# classes that share an appearance (the report's per-class deltas are grouped by these)
CONFUSABLE = {"flat": (ROAD, SIDEWALK), "construction": (BUILDING, WALL, FENCE), "nature": (VEGETATION, TERRAIN),
              "human": (PERSON, RIDER), "vehicle": (CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE),
              "pole-like": (POLE, LIGHT, SIGN)}
THIN = (POLE, LIGHT, SIGN, BICYCLE, PERSON, RIDER)
IGNORE_INDEX = 255
# mean colour of each appearance group (sky has its own); per image and class a colour is drawn
# around it with a spread wide enough that neighbouring groups overlap
GROUP_COLOURS = {"flat": (0.45, 0.45, 0.48), "construction": (0.55, 0.45, 0.40), "nature": (0.35, 0.55, 0.35),
                 "human": (0.60, 0.40, 0.45), "vehicle": (0.40, 0.42, 0.60), "pole-like": (0.55, 0.55, 0.35),
                 "sky": (0.55, 0.65, 0.80)}
COLOUR_SPREAD = 0.22


def _group_of(cls):
    return next((g for g, members in CONFUSABLE.items() if cls in members), "sky")


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _box(rows, cols, bottom, height, cx, width):
    return (rows < bottom) & (rows >= bottom - height) & ((cols - cx).abs() < width / 2)


def _background(g, label, rows, cols, H, W):
    """Sky, buildings, trees, the road in perspective with sidewalks, walls or fences along them,
    terrain beyond. Returns (horizon row, vanishing column, half road width at a row)."""
    horizon = int(_uniform(g, 0.38, 0.52) * H)
    x = 0
    while x < W:  # buildings standing on the horizon, some gaps filled by trees
        w = int(_uniform(g, 0.08, 0.3) * W) + 1
        top = int(_uniform(g, 0.05, 0.85) * horizon)
        label[top:horizon, x:x + w] = BUILDING if torch.rand((), generator=g) < 0.8 else VEGETATION
        x += w
    for _ in range(int(_uniform(g, 1, 4))):  # tree crowns
        cy, cx = _uniform(g, 0.45, 1.0) * horizon, _uniform(g, 0, W)
        ry, rx = _uniform(g, 0.08, 0.2) * H, _uniform(g, 0.04, 0.12) * W
        label[((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1] = VEGETATION
    depth = ((rows - horizon).clamp_min(0) / max(H - horizon, 1)).float()
    vanish = _uniform(g, 0.35, 0.65) * W
    road_scale, walk_scale = _uniform(g, 0.3, 0.55), _uniform(g, 0.08, 0.2)
    def half_road(d):  # half the road's width at depth d in [0, 1] (0 at the horizon)
        return 2 + d * road_scale * W

    road_half, walk = half_road(depth), 1 + depth * walk_scale * W
    off = (cols - vanish).abs()
    ground = rows >= horizon
    label[ground] = TERRAIN
    label[ground & (off < road_half + walk)] = SIDEWALK
    label[ground & (off < road_half)] = ROAD
    # a low wall or fence on the outer edge of each sidewalk, for part of its length
    for side in (-1, 1):
        if torch.rand((), generator=g) < 0.7:
            cls = WALL if torch.rand((), generator=g) < 0.5 else FENCE
            edge = road_half + walk
            band = (off >= edge) & (off < edge + 1 + depth * 0.06 * W) & ((cols - vanish) * side > 0)
            near = rows >= horizon + _uniform(g, 0.0, 0.5) * (H - horizon)
            label[ground & band & near] = cls
    return horizon, vanish, lambda row: half_road(max(row - horizon, 0) / max(H - horizon, 1))


def _objects(g, label, rows, cols, H, W, horizon, vanish, half_road_at):
    """Vehicles on the road, people on the sidewalk, riders on two-wheelers, poles with lights and
    signs at the roadside, sometimes a train at the horizon; far ones first so near ones occlude."""
    if torch.rand((), generator=g) < 0.15:  # a train crossing at the horizon
        h = 3 + 0.12 * H
        label[_box(rows, cols, horizon + 2, h, _uniform(g, 0.2, 0.8) * W, _uniform(g, 0.35, 0.7) * W)] = TRAIN
    kinds = [(CAR, 0, 5), (TRUCK, 0, 2), (BUS, 0, 1.6), (PERSON, 0, 5), (RIDER, 0, 2.5), (POLE, 0, 4)]
    objects = []
    for cls, lo, hi in kinds:
        for _ in range(int(_uniform(g, lo, hi))):
            objects.append((_uniform(g, horizon + 3, H), cls))
    for bottom, cls in sorted(objects):
        scale = (bottom - horizon) / max(H - horizon, 1)
        side = 1 if torch.rand((), generator=g) < 0.5 else -1
        half_road = half_road_at(bottom)
        roadside = vanish + side * (half_road + _uniform(g, 0.1, 1.0) * (1 + scale * 0.15 * W))
        if cls in (CAR, TRUCK, BUS):
            h = {CAR: 3 + scale * 0.28 * H, TRUCK: 4 + scale * 0.45 * H, BUS: 5 + scale * 0.5 * H}[cls]
            w = h * {CAR: _uniform(g, 1.5, 2.3), TRUCK: _uniform(g, 1.0, 1.4), BUS: _uniform(g, 2.2, 3.2)}[cls]
            label[_box(rows, cols, bottom, h, vanish + side * _uniform(g, 0, 0.8) * half_road, w)] = cls
        elif cls == PERSON:
            h = 4 + scale * 0.4 * H
            label[_box(rows, cols, bottom, h, roadside, max(1.5, 0.3 * h))] = PERSON
        elif cls == RIDER:  # a person seated on a bicycle or motorcycle at the road's edge
            wheel = BICYCLE if torch.rand((), generator=g) < 0.5 else MOTORCYCLE
            h = 3 + scale * 0.22 * H
            cx = vanish + side * _uniform(g, 0.6, 1.0) * half_road
            w = h * (1.4 if wheel == BICYCLE else 1.7)
            label[_box(rows, cols, bottom, h, cx, w)] = wheel
            if wheel == BICYCLE:  # the frame is thin: background shows between the wheels
                hole = _box(rows, cols, bottom - 0.3 * h, 0.4 * h, cx, 0.45 * w)
                label[hole & (label == BICYCLE)] = ROAD
            label[_box(rows, cols, bottom - 0.6 * h, 1.1 * h, cx, max(1.5, 0.35 * h))] = RIDER
        else:  # a pole at the roadside, with a traffic light on top or a sign half way, or neither
            h = 8 + scale * 0.75 * H
            w = max(1.0, 1 + scale * 0.04 * W)
            label[_box(rows, cols, bottom, h, roadside, w)] = POLE
            u = torch.rand((), generator=g).item()
            if u < 0.4:
                label[_box(rows, cols, bottom - h, 0.18 * h, roadside, 2.2 * w)] = LIGHT
            elif u < 0.8:
                label[_box(rows, cols, bottom - 0.55 * h, 0.14 * h, roadside, 3.5 * w)] = SIGN


def _layout(g, H, W):
    """The label map [H, W] of one scene (before the ignored border band)."""
    rows = torch.arange(H)[:, None].expand(H, W)
    cols = torch.arange(W)[None, :].expand(H, W)
    label = torch.full((H, W), SKY)
    horizon, vanish, half_road_at = _background(g, label, rows, cols, H, W)
    _objects(g, label, rows, cols, H, W, horizon, vanish, half_road_at)
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


def _texture(g, cls, H, W):
    """Flat, stripes either way or noise, drawn alike for every class; fences are always barred
    (vertical stripes), the one cue that tells them from walls besides context."""
    kind = 2 if cls == FENCE else int(_uniform(g, 0, 4))
    rows = torch.arange(H, dtype=torch.float32)[:, None]
    cols = torch.arange(W, dtype=torch.float32)[None, :]
    freq = _uniform(g, 0.2, 1.2) if cls != FENCE else _uniform(g, 1.2, 2.0)
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
        centre = torch.tensor(GROUP_COLOURS[_group_of(cls)]).view(3, 1, 1)
        colour = centre + COLOUR_SPREAD * (2 * torch.rand(3, 1, 1, generator=g) - 1)
        image = torch.where(mask, colour + _texture(g, cls, H, W), image)
    # lighting: a brightness ramp in a random direction, then noise and, sometimes, blur
    angle = _uniform(g, 0, 2 * math.pi)
    ramp = (math.cos(angle) * torch.linspace(-1, 1, W)[None, :] + math.sin(angle) * torch.linspace(-1, 1, H)[:, None])
    image = image * (_uniform(g, 0.7, 1.2) + 0.25 * ramp)
    image = image + _uniform(g, 0.02, 0.08) * torch.randn(3, H, W, generator=g)
    if torch.rand((), generator=g) < 0.5:
        image = F.avg_pool2d(image[None], 3, 1, 1, count_include_pad=False)[0]
    return image.clamp(0, 1), _ignore_border(label)


def render_scenes(seed, size, start, stop):
    """Scenes start..stop-1 of the set drawn with `seed`, as stored by StreetScenes:
    ``(images [n, 3, H, W] uint8, labels [n, H, W] uint8)``."""
    images, labels = [], []
    for i in range(start, stop):
        img, lab = render_scene(i, seed, size)
        images.append((img * 255).round().to(torch.uint8))
        labels.append(lab.to(torch.uint8))
    if not images:
        return torch.empty(0, 3, *size, dtype=torch.uint8), torch.empty(0, *size, dtype=torch.uint8)
    return torch.stack(images), torch.stack(labels)


class StreetScenes(Dataset):
    """A fixed-size set of generated scenes, rendered once and kept in memory (uint8 images).

    Args:
        num_images: how many scenes. seed: which set (train, validation and the weight-tuning
            split use different seeds). size: (H, W), default (128, 256).
        progress: a callable(done, total) or None.
        map: a callable(fn, items) -> iterable of fn(*item) in order, e.g. ``Workers.map``, to
            render chunks of scenes in parallel; default None: one after the other. Every scene
            draws from its own generator seeded by (seed, index), so the set is the same either way.
        chunk: scenes per piece given to `map`, at most. Default: 50, fewer where that would
            leave under ten pieces, so that progress comes at least every 10 %.

    Items: ``(image [3, H, W] float32 in [0, 1], label [H, W] int64)``.
    """

    def __init__(self, num_images, seed=0, size=(128, 256), progress=None, map=None, chunk=50):
        self.size = tuple(size)
        chunk = max(1, min(chunk, -(-num_images // 10)))
        pieces = [(seed, self.size, a, min(a + chunk, num_images)) for a in range(0, num_images, chunk)]
        # filled chunk by chunk: a chunk from a worker arrives in shared memory, released once copied
        self.images = torch.empty(num_images, 3, *self.size, dtype=torch.uint8)
        self.labels = torch.empty(num_images, *self.size, dtype=torch.uint8)
        for (_, _, start, stop), (img, lab) in zip(pieces, (map or serial_map)(render_scenes, pieces)):
            self.images[start:stop], self.labels[start:stop] = img, lab
            if progress is not None:
                progress(stop, num_images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 255, self.labels[i].long()
