"""Random tensors for the fuzzer: features in a dtype, layout and value scale, and label maps in a
pattern. Two steps, so that a case can be printed and rebuilt:

- ``draw_*(rng, ...)`` picks the description of a tensor (plain values: a dict that prints as a
  reproducer and is all `make_*` needs), from a ``random.Random``;
- ``make_*(spec, seed, device)`` builds the tensor from its description and a seed, the values
  drawn in float64 on the CPU (the same on every device and for every dtype), then rounded to the
  spec's dtype, moved, and laid out.

The targets and the reference therefore see the same rounded values; only what the ops do with
them differs.
"""
import random

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Layouts of a [B, C, H, W] map, each a way the kernels read memory: channels_last (pixel-major),
# strided (every other channel of a wider tensor), offset (a storage offset of 3 elements: vector
# loads must not assume alignment), transposed (H and W strides swapped), expanded (stride 0 over
# the batch, one image's memory read B times).
LAYOUTS = ("contiguous", "channels_last", "strided", "offset", "transposed", "expanded")
LABEL_PATTERNS = ("uniform", "blocks", "rows", "one_class", "absent")
LABEL_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8}


def pick(rng: random.Random, weighted):
    """One value of ``{value: weight}``."""
    values = list(weighted)
    return rng.choices(values, weights=[weighted[v] for v in values])[0]


# Spatial and channel sizes are drawn up to SIZE_SCALE times their usual bound (batch sizes, drawn
# up to 3, are not scaled, and above scale 1 not drawn at a tile size either):
# `python -m tests.fuzz --size-scale 8` reaches the kernels' multi-block and multi-segment plans at
# a few seconds a case on the emulator. Cases differ by scale: a reproducer names it.
SIZE_SCALE = 1


def draw_size(rng, lo=0, hi=12, empty=0.03):
    """A spatial or channel size: mostly small and odd-friendly, 0 with probability `empty`
    (empty maps and batches must give 0-valued losses, not errors), now and then a size past a
    kernel's tile (33, 65) or one that is 1 (a single row or column)."""
    if hi > 3:
        hi *= SIZE_SCALE
    if lo == 0 and rng.random() < empty:
        return 0
    lo = max(lo, 1)
    r = rng.random()
    if r < 0.1:
        return lo
    if r < 0.16:
        tile = rng.choice((17, 33, 65))
        # a batch (hi <= 3) of tile size beside scaled maps asked the emulator for 113M-element
        # maps (65 x 120 x 122 x 117, 12 GB at --size-scale 12): scaled cases keep batches at hi
        return max(lo, tile if hi > 3 or SIZE_SCALE == 1 else hi)
    return rng.randint(lo, max(lo, hi))


def draw_dtype(rng, half=True):
    """float32 most often (the training dtype), float64 (the tightest tolerance: a wrong index or
    a missing term cannot hide in rounding), and half and bfloat16 where the op takes them."""
    weights = {"float32": 5, "float64": 3}
    if half:
        weights.update(float16=1, bfloat16=1)
    return pick(rng, weights)


# the largest finite value of the input dtypes whose range a drawn offset can pass
FINITE_MAX = {"float16": 65504.0}


def draw_scale(rng):
    """A value scale: features come in any scale (SKD lost accuracy at a student 1e-3 of its
    teacher's scale; normalised distances must not depend on it)."""
    return pick(rng, {1.0: 6, 1e-3: 1, 1e3: 1, 1e-4: 0.5, 30.0: 1})


def draw_feats(rng, shape, dtype, offset=True, layouts=LAYOUTS, scale=None):
    """Description of a feature map: shape, dtype, layout, scale and a common offset (ReLU-like
    features share a per-channel offset far above their spread: METHOD.md 8)."""
    scale = draw_scale(rng) if scale is None else scale
    off = 0.0
    if offset and rng.random() < 0.2:
        off = scale * pick(rng, {3.0: 2, 100.0: 1, -10.0: 1})
    if abs(off) + 8 * scale > FINITE_MAX.get(dtype, float("inf")):
        # an offset of 1e5 is inf in float16 (a network's half features are finite): no offset
        # there, with the same draws (every other case of the seed stays as it was)
        off = 0.0
    return {"shape": list(shape), "dtype": dtype, "layout": rng.choice(layouts), "scale": scale, "offset": off}


def values(shape, seed, scale=1.0, offset=0.0):
    """float64 normal values on the CPU, the same for every dtype and device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset


def make_feats(spec, seed, device="cpu", grad=False):
    """The map `spec` describes. With `grad`, the memory it views is a leaf that requires grad,
    and the map a view of it in the graph (autograd.grad can ask for the map's gradient)."""
    shape, dtype = spec["shape"], DTYPES[spec["dtype"]]
    v = values(shape, seed, spec["scale"], spec["offset"])
    layout = spec["layout"]
    if layout == "expanded":
        v = v[:1].expand(shape)  # one image, repeated: the values must agree with the view
    v = v.to(dtype)
    base, view = _layout(v, layout)
    base = base.to(device).requires_grad_(grad)
    x = view(base)
    if not grad:
        x = x.detach()
    if spec.get("special"):
        x = _with_special(x, spec["special"], seed)
    return x


def _layout(v, layout):
    """(memory, view of it) holding the values `v` in `layout`."""
    if layout == "channels_last" and v.dim() == 4:
        return v.contiguous(memory_format=torch.channels_last), lambda b: b
    if layout == "strided" and v.dim() >= 2:
        wide = torch.zeros(v.shape[0], 2 * v.shape[1], *v.shape[2:], dtype=v.dtype)
        wide[:, ::2] = v
        return wide, lambda b: b[:, ::2]
    if layout == "offset":
        flat = torch.zeros(v.numel() + 3, dtype=v.dtype)
        flat[3:] = v.reshape(-1)
        return flat, lambda b: b[3:].view(v.shape)
    if layout == "transposed" and v.dim() == 4:
        return v.transpose(2, 3).contiguous(), lambda b: b.transpose(2, 3)
    if layout == "expanded" and v.dim() >= 1 and v.shape[0] > 0:
        return v[:1].contiguous(), lambda b: b.expand(v.shape)
    return v.contiguous(), lambda b: b


def _with_special(x, special, seed):
    """Non-finite entries, out of autograd's sight (they replace values, not add to them):
    "neg_inf" sets about a tenth of the entries to -inf (logits a teacher or student rules out),
    "nan" one entry to NaN."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        if x.numel() == 0:
            return x
        if special == "neg_inf":
            mask = (torch.rand(x.shape, generator=g) < 0.1).to(x.device)
            return torch.where(mask, torch.full_like(x, float("-inf")), x)
        if special == "nan":
            flat = torch.zeros(x.numel(), dtype=torch.bool)
            flat[int(torch.randint(x.numel(), (1,), generator=g))] = True
            return torch.where(flat.view(x.shape).to(x.device), torch.full_like(x, float("nan")), x)
    raise ValueError(f"unknown special value {special!r}")


def draw_labels(rng, B, K, feat_hw, resize=0.4):
    """Description of a [B, Hy, Wy] label map for features of size `feat_hw`: at the features'
    size, or (with probability `resize`) another one, larger, smaller or at a non-integer ratio,
    so that the kernels' nearest resize is compared with F.interpolate's."""
    H, W = feat_hw
    Hy, Wy = H, W
    if rng.random() < resize and H * W > 0:
        Hy, Wy = (rng.choice((2 * n, n + 1, max(1, n // 2), max(1, (3 * n) // 2), rng.randint(1, 20)))
                  for n in (H, W))
    dtype = pick(rng, {"int64": 5, "int32": 1, "int16": 1, "uint8": 1 if K < 255 else 0})
    ignore = pick(rng, {255: 4, -1: 1, K: 1, 1000: 1})
    if dtype == "uint8" and not 0 <= ignore <= 255:
        ignore = 255
    if dtype == "int16" and ignore == 1000 and K > 1000:
        ignore = -1
    frac = pick(rng, {0.0: 2, 0.05: 3, 0.3: 2, 0.9: 1, 1.0: 0.5})  # 1.0: every pixel ignored
    return {"shape": [B, Hy, Wy], "K": K, "pattern": pick(rng, {p: 1 for p in LABEL_PATTERNS}),
            "ignore_frac": frac, "ignore_index": ignore, "dtype": dtype}


def make_labels(spec, seed, device="cpu"):
    """The label map `spec` describes: classes in [0, K) in a pattern, then a salt-and-pepper
    share of ignore_index (a class the pattern uses may vanish: that is an absent class too)."""
    B, Hy, Wy = spec["shape"]
    K, pattern = spec["K"], spec["pattern"]
    g = torch.Generator().manual_seed(seed)
    if pattern == "blocks":  # piecewise constant: long runs in both directions
        bs = int(torch.randint(1, 6, (1,), generator=g))
        coarse = torch.randint(0, K, (B, -(-Hy // bs), -(-Wy // bs)), generator=g)
        y = coarse.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :Hy, :Wy]
    elif pattern == "rows":  # runs along rows of random length (the CPU kernels' run paths)
        cls = torch.randint(0, K, (B, Hy, Wy), generator=g)
        run = (torch.rand(B, Hy, Wy, generator=g) < 0.2).long().cumsum(2)
        y = torch.gather(cls, 2, run.clamp_max(max(Wy - 1, 0)))
    elif pattern == "one_class":
        y = torch.full((B, Hy, Wy), int(torch.randint(0, K, (1,), generator=g)))
    elif pattern == "absent":  # a few classes of K only
        present = torch.randperm(K, generator=g)[:max(1, K // 3)]
        y = present[torch.randint(0, len(present), (B, Hy, Wy), generator=g)]
    else:
        y = torch.randint(0, K, (B, Hy, Wy), generator=g)
    y = torch.where(torch.rand(B, Hy, Wy, generator=g) < spec["ignore_frac"], spec["ignore_index"], y)
    return y.to(LABEL_DTYPES[spec["dtype"]]).to(device)


def draw_labels_for(rng, feats_spec, K):
    """Labels for features [B, C, H, W]."""
    B, _, H, W = feats_spec["shape"]
    return draw_labels(rng, B, K, (H, W))


def draw_num_classes(rng):
    """K: mostly small; one class; now and then past a kernel's tile of classes (K > 32, > 64)."""
    return pick(rng, {1: 1, 2: 2, 3: 2, 5: 3, 7: 2, 19: 2, 40: 1, 70: 0.5})
