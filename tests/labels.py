"""Label maps that steer the label-reading kernels into each of their branches.

The CUDA centroid kernel (csrc/cuda/class_centroids_cuda.cu) walks each image's feature map in
warps of 32 consecutive pixels (flat index p = row * W + col) and takes one of three branches:
  "uniform"  every lane holds the same class: shuffle reduction, one shared atomic per channel;
  "ignored"  every lane ignored (or past the end of the map): the warp is skipped;
  "mixed"    lanes differ: one shared atomic per in-range lane, ignored lanes add nothing.
"tail": H * W is not a multiple of 32, so the last warp's lanes past the end read as ignored (a
class run that ends the map becomes a mixed warp). Per block it sums a tile of 8 channels:
"partial-tile" (C % 8 != 0) and "multi-tile" (C > 8, a grid of several tiles, of which only the
first writes counts). "absent": a class no pixel has (count 0, centroid 0).
Every label-reading kernel (centroids forward and backward, the IFVD cosine kernels) resizes the
labels by nearest neighbour on the fly: "same-size", "resize-down", "resize-up"; reads uint8,
int32 or int64 labels ("uint8", "int32"; int64 the default) and compares with ignore_index
("ignore=-1" for a negative one). The IFVD kernels (pixel_centroid_cosine_cuda.cu and its slots twin) also branch on
an ignored pixel (cosine 1, no gradient) and on a norm product under eps ("clamped-cosine": a
class whose features are all zero).

Each LabelCase names the branches it targets; test_label_paths.py checks that the labels really
contain the warps it claims, then runs the centroid, IDD and IFVD losses on it on every device.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from idd_ops import reference

WARP = 32
TILE = 8
IGNORE = 255


@dataclass(frozen=True)
class LabelCase:
    id: str
    targets: tuple  # the branch names of the module docstring this case reaches
    B: int
    C: int
    H: int
    W: int
    Hy: int
    Wy: int
    K: int
    build: object = field(repr=False)  # (case, generator) -> int64 labels [B, Hy, Wy]
    label_dtype: torch.dtype = torch.int64
    ignore_index: int = IGNORE
    zero_class: int = -1  # features of this class are set to 0 (the clamped cosine)

    def labels(self, device="cpu", seed=0):
        y = self.build(self, torch.Generator().manual_seed(seed))
        y = torch.where(y == IGNORE, torch.full_like(y, self.ignore_index), y)
        return y.to(dtype=self.label_dtype, device=device)

    def feats(self, C=None, dtype=torch.float64, device="cpu", seed=0):
        """Features [B, C, H, W] (C defaults to the case's), 0 on the pixels of zero_class."""
        g = torch.Generator().manual_seed(seed + 100)
        x = torch.randn(self.B, C or self.C, self.H, self.W, generator=g, dtype=torch.float64)
        if self.zero_class >= 0:
            y = at_feature_size(self.labels(seed=0), self.H, self.W)
            x = x.masked_fill((y == self.zero_class)[:, None], 0.0)
        return x.to(device=device, dtype=dtype)


def at_feature_size(labels, H, W):
    """Labels [B, Hy, Wy] -> [B, H, W] int64 by F.interpolate's nearest rule (the kernels' rule)."""
    return reference.resize_labels(labels, (H, W))


def warp_kinds(labels, H, W, num_classes, ignore_index=IGNORE):
    """How many warps of each kind the CUDA centroid kernel meets: {"uniform", "ignored", "mixed"}
    over every image, and "tail" (1 where H * W leaves a partly filled last warp)."""
    y = at_feature_size(labels.cpu(), H, W).flatten(1)
    slot = torch.where((y == ignore_index) | (y < 0) | (y >= num_classes), -1, y)
    pad = (-slot.shape[1]) % WARP
    warps = F.pad(slot, (0, pad), value=-1).view(slot.shape[0], -1, WARP)
    same = (warps == warps[..., :1]).all(-1)
    return {"uniform": int((same & (warps[..., 0] >= 0)).sum()),
            "ignored": int((same & (warps[..., 0] < 0)).sum()),
            "mixed": int((~same).sum()), "tail": int(pad > 0)}


# --- builders: (case, generator) -> int64 labels [B, Hy, Wy] -------------------------------------

def _rows(case, g):
    """Each label row one class, cycling: warps within a row are uniform where W % 32 == 0."""
    rows = (torch.arange(case.Hy) // max(1, case.Hy // case.H)) % case.K
    y = rows.view(1, -1, 1).expand(case.B, case.Hy, case.Wy).clone()
    return (y + torch.arange(case.B).view(-1, 1, 1)) % case.K  # images differ


def _ignored_rows(case, g):
    """Feature rows alternate between all ignored and one class."""
    y = _rows(case, g)
    y[:, ::2] = IGNORE
    return y


def _random(case, g):
    """A random class per pixel, 20 % ignored: nearly every warp mixed."""
    y = torch.randint(0, case.K, (case.B, case.Hy, case.Wy), generator=g)
    y[torch.rand(case.B, case.Hy, case.Wy, generator=g) < 0.2] = IGNORE
    return y


def _blocks(case, g):
    """Random classes on a coarse grid (street-like regions), no ignored pixel."""
    coarse = torch.randint(0, case.K, (case.B, max(1, case.Hy // 4), max(1, case.Wy // 4)), generator=g)
    return at_feature_size(coarse, case.Hy, case.Wy)


def _all_ignored(case, g):
    return torch.full((case.B, case.Hy, case.Wy), IGNORE, dtype=torch.long)


def _one_class(case, g):
    return torch.full((case.B, case.Hy, case.Wy), case.K // 2, dtype=torch.long)


def _few_classes(case, g):
    """Rows of only classes 0, K // 2 and K - 1, every fourth row salted with class K // 2;
    image 1 lacks class 0."""
    ids = torch.tensor([0, case.K // 2, case.K - 1])
    y = ids[_rows(case, g) % 3]
    y[:, ::4, ::5] = case.K // 2
    y[1:][y[1:] == 0] = case.K - 1
    return y


def _runs(case, g, length):
    """Flat runs of `length` pixels per class (at feature size = label size)."""
    flat = (torch.arange(case.Hy * case.Wy) // length) % case.K
    return flat.view(1, case.Hy, case.Wy).expand(case.B, -1, -1).clone()


def _straddling_runs(case, g):
    """Runs of 33 pixels: every warp holds the end of one run and the start of the next."""
    return _runs(case, g, 33)


def _tail_run(case, g):
    """One class on the whole map but for a few mixed pixels: the tail warp's in-range lanes
    agree and its lanes past the end do not."""
    y = torch.full((case.B, case.Hy, case.Wy), 1, dtype=torch.long)
    y[:, :2, :3] = 0
    y[:, 0, 0] = IGNORE
    return y


def _zero_class(case, g):
    """Blocks with a row band of class 1 (whose features the case sets to 0)."""
    y = _blocks(case, g).clamp_min(2) % case.K
    y[:, case.Hy // 2:case.Hy // 2 + 2] = 1
    y[:, 0] = IGNORE
    return y


CASES = [
    LabelCase("uniform-runs", ("uniform", "multi-tile", "same-size"), 2, 16, 8, 64, 8, 64, 5, _rows),
    LabelCase("uniform-runs-resized", ("uniform", "resize-down", "partial-tile"), 2, 12, 8, 96, 32, 384, 6, _rows),
    LabelCase("uniform-runs-uint8", ("uniform", "uint8"), 2, 8, 4, 32, 4, 32, 4, _rows, label_dtype=torch.uint8),
    LabelCase("ignored-warps", ("ignored", "uniform", "absent"), 2, 9, 6, 32, 6, 32, 7, _ignored_rows),
    LabelCase("mixed-warps", ("mixed", "same-size"), 2, 8, 16, 16, 16, 16, 5, _random),
    LabelCase("mixed-warps-resized", ("mixed", "resize-down"), 2, 8, 9, 13, 21, 30, 5, _random),
    LabelCase("straddling-runs", ("mixed", "uniform"), 2, 8, 8, 64, 8, 64, 4, _straddling_runs),
    LabelCase("blocks-resize-up", ("mixed", "uniform", "resize-up"), 2, 8, 24, 64, 8, 16, 6, _blocks),
    LabelCase("all-ignored", ("ignored", "absent"), 2, 8, 8, 32, 16, 64, 4, _all_ignored),
    LabelCase("one-class", ("uniform", "absent"), 2, 8, 8, 32, 8, 32, 4, _one_class),
    LabelCase("absent-classes", ("absent", "uniform", "mixed", "int32"), 2, 8, 16, 32, 16, 32, 12, _few_classes,
              label_dtype=torch.int32),
    LabelCase("odd-sizes", ("tail", "mixed", "partial-tile", "multi-tile", "resize-down"), 3, 13, 7, 9, 21, 27, 4,
              _tail_run),
    LabelCase("odd-sizes-ignore-minus-one", ("tail", "mixed", "ignore=-1", "int32"), 2, 5, 5, 11, 5, 11, 3,
              _tail_run, label_dtype=torch.int32, ignore_index=-1),
    LabelCase("clamped-cosine", ("clamped-cosine", "mixed", "uniform", "absent"), 2, 8, 8, 32, 8, 32, 6, _zero_class,
              zero_class=1),
]

IDS = [c.id for c in CASES]
