import pytest
import torch

import idd_ops
from idd_ops import reference
from idd_ops.position import KINDS, num_maps
from conftest import TOLERANCES, gradcheck

ALL = list(KINDS)


def test_maps_values_and_range():
    maps = idd_ops.position_maps(ALL, 5, 9, dtype=torch.float64)
    assert maps.shape == (5 + 4 * 2, 5, 9)
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps[0, 2], torch.linspace(0, 1, 9, dtype=torch.float64))  # horizontal
    torch.testing.assert_close(maps[1, :, 4], torch.linspace(0, 1, 5, dtype=torch.float64))  # vertical
    assert maps[2, 2, 4] == 1 and maps[2, 0, 0] < maps[2, 1, 2]  # gaussian peaks at the centre
    assert maps[3, :, 0].tolist() == [0, 0, 1, 0, 1]  # 4 horizontal bands over 5 rows: floor(4y/5) mod 2
    assert maps[4, 0].tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("kinds", [ALL, ["gaussian"], ["sinusoidal"], ["horizontal_stripes", "vertical"]])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("size", [(2, 2), (7, 9), (16, 33)])
def test_matches_reference(device, kinds, reduction, size):
    p = torch.randn(2, num_maps(kinds), *size, dtype=torch.float64, device=device)
    w = torch.randn_like(p)
    pa, pb = p.clone().requires_grad_(), p.clone().requires_grad_()
    la = idd_ops.position_encoding_loss(pa, kinds, reduction=reduction)
    lb = reference.position_encoding_loss(pb, kinds, reduction=reduction)
    ((la * w).sum() if reduction == "none" else la).backward()
    ((lb * w).sum() if reduction == "none" else lb).backward()
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-10)


def test_stripes_with_many_bands_in_float32(device):
    """floor(num_stripes * y / H) mod 2 in integer arithmetic: with stripe counts above 2^23 (still
    exact in float32) a float32 product num_stripes * y and its quotient round into another band for
    some rows and columns. Guards the stripes' integer arithmetic for float32 inputs, and the count
    kept in float64 past 2^24 (as a float32 parameter, 2^31 - 1 rounded to 2^31 and gave other
    bands than the reference)."""
    kinds = ["horizontal_stripes", "vertical_stripes"]
    p = torch.rand(2, num_maps(kinds), 9, 12, device=device)  # both counts round into other bands at 9 and 12
    for n in (10_000_003, 3 * 2**22 + 1, 2**31 - 1, 2**24 + 1):
        la = idd_ops.position_encoding_loss(p, kinds, reduction="none", num_stripes=n)
        lb = reference.position_encoding_loss(p.double(), kinds, reduction="none", num_stripes=n)
        torch.testing.assert_close(la.double(), lb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    p = torch.rand(3, num_maps(ALL), 12, 20, device=device).to(dtype)
    la = idd_ops.position_encoding_loss(p, ALL)
    lb = reference.position_encoding_loss(p.double(), ALL)
    tol = TOLERANCES[dtype]
    assert la.dtype == dtype
    torch.testing.assert_close(la.double(), lb, rtol=tol, atol=tol)


def test_options_and_non_contiguous(device):
    p = torch.rand(2, 20, 9, 11, dtype=torch.float64, device=device).transpose(2, 3).contiguous().transpose(2, 3)
    kw = dict(num_frequencies=3, num_stripes=3, sigma=0.4)
    kinds = ["sinusoidal", "vertical_stripes", "horizontal_stripes", "gaussian", "horizontal", "vertical",
             "gaussian", "vertical"][: 4]
    k = num_maps(kinds, 3)
    torch.testing.assert_close(idd_ops.position_encoding_loss(p[:, :k], kinds, **kw),
                               reference.position_encoding_loss(p[:, :k], kinds, **kw))


def test_gradcheck(device):
    p = torch.randn(2, num_maps(ALL), 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(lambda x: idd_ops.position_encoding_loss(x, ALL), (p,))
    assert gradcheck(lambda x: idd_ops.position_encoding_loss(x, ALL, reduction="none"), (p,))


def test_opcheck_and_compile(device):
    p = torch.randn(2, 3, 6, 7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.idd_ops.position_encoding_loss.default, (p, [0, 2, 5], [0.0, 0.25, 1.0], "mean"))
    torch._dynamo.reset()
    fn = torch.compile(idd_ops.position_encoding_loss, fullgraph=True, dynamic=True)
    for size in ((6, 7), (8, 10)):
        x = torch.randn(2, 3, *size, device=device)
        torch.testing.assert_close(fn(x, ["horizontal", "gaussian", "vertical"]),
                                   idd_ops.position_encoding_loss(x, ["horizontal", "gaussian", "vertical"]))


@pytest.mark.parametrize("call,exc,text", [
    (lambda: idd_ops.position_encoding_loss(torch.zeros(1, 1, 4, 4), ["diagonal"]), ValueError, "kinds"),
    (lambda: idd_ops.position_encoding_loss(torch.zeros(1, 2, 4, 4), ["gaussian"]), ValueError, "pred_maps: has 2 maps"),
    (lambda: idd_ops.position_encoding_loss(torch.zeros(1, 1, 1, 4), ["vertical"]), ValueError, "size"),
    (lambda: idd_ops.position_encoding_loss(torch.zeros(1, 1, 4, 1), ["gaussian"]), ValueError, "size"),
    (lambda: idd_ops.position_encoding_loss(torch.zeros(1, 1, 4), ["gaussian"]), ValueError, "pred"),
    (lambda: idd_ops.position_encoding_loss(torch.zeros(1, 1, 4, 4), ["gaussian"], reduction="avg"), ValueError,
     "reduction"),
    (lambda: idd_ops.position_maps([], 4, 4), ValueError, "kinds"),
    (lambda: idd_ops.position_maps(["sinusoidal"], 4, 4, num_frequencies=0), ValueError, "num_frequencies"),
    (lambda: idd_ops.position_maps(["horizontal"], 4, 1), ValueError, "size"),
    # counts past int64's band index (count * row), frequencies past 2^62, sigma inf
    (lambda: idd_ops.position_encoding_loss(torch.rand(1, 1, 8, 8), ["vertical_stripes"], num_stripes=10 ** 20),
     ValueError, r"num_stripes: expected an int in \[1, 2147483647\]"),
    (lambda: idd_ops.position_maps(["sinusoidal"], 4, 4, num_frequencies=2000), ValueError, "num_frequencies"),
    (lambda: idd_ops.position_maps(["gaussian"], 4, 4, sigma=float("inf")), ValueError, "sigma: expected a finite"),
    (lambda: idd_ops.position_encoding_loss(torch.rand(1, 1, 9, 9), ["gaussian"], sigma=1e-50), ValueError,
     "sigma: expected a normal float32"),  # 0 in float32: 0 / 0 at the centre, a NaN loss
    # the op itself, as torch.ops calls reach it (a NaN count was cast to int64: undefined)
    (lambda: torch.ops.idd_ops.position_encoding_loss(torch.rand(1, 1, 8, 8), [3], [float("nan")], "mean"),
     ValueError, r"params: map 0 \(stripes\) needs a whole stripe count"),
    (lambda: torch.ops.idd_ops.position_encoding_loss(torch.rand(1, 2, 8, 8), [0, 4], [0.0, 2.0 ** 62], "mean"),
     ValueError, r"params: map 1 \(stripes\)"),
    (lambda: torch.ops.idd_ops.position_encoding_loss(torch.rand(1, 1, 8, 8), [2], [0.0], "mean"),
     ValueError, r"params: map 0 \(gaussian\)"),
    (lambda: torch.ops.idd_ops.position_encoding_loss(torch.rand(1, 1, 8, 8), [5], [float("inf")], "mean"),
     ValueError, r"params: map 0 \(sinusoid\)"),
    (lambda: torch.ops.idd_ops.position_encoding_loss(torch.rand(1, 1, 8, 8), [5], [1e300], "mean"),
     ValueError, r"params: map 0 \(sinusoid\)"),  # finite in double, inf as a float: a NaN loss
    (lambda: torch.ops.idd_ops.position_encoding_loss(torch.rand(1, 1, 9, 9), [2], [1e-50], "mean"),
     ValueError, r"params: map 0 \(gaussian\)"),
    # the read-out checks the map options it keeps when it is built, not when its maps are made
    (lambda: idd_ops.nn.PositionEncodingModule(4, "horizontal_stripes", num_stripes=0), ValueError, "num_stripes"),
    (lambda: idd_ops.nn.PositionEncodingModule(4, "gaussian", sigma=-1.0), ValueError, "sigma"),
    (lambda: idd_ops.nn.PositionEncodingModule(4, "gaussian", sigma="wide"), TypeError, "sigma"),
])
def test_bad_input(call, exc, text):
    with pytest.raises(exc, match=text):
        call()


def test_stripes_allow_size_one():
    assert idd_ops.position_maps(["horizontal_stripes"], 1, 1).shape == (1, 1, 1)


def test_probe_is_real():
    """Features that contain position (coordinates + noise) probe far better than pure noise."""
    torch.manual_seed(0)
    kinds = ["horizontal", "vertical", "gaussian"]
    H, W = 16, 16
    coords = idd_ops.position_maps(["horizontal", "vertical"], H, W)
    batches = [torch.randn(4, 8, H, W) for _ in range(3)]
    with_pos = lambda x: torch.cat([x[:, :6], coords.expand(x.shape[0], -1, -1, -1)], 1) + 0.1 * x  # noqa: E731
    no_pos = lambda x: x  # noqa: E731
    _, err_pos = idd_ops.probe_position_information(with_pos, batches, kinds, steps=150, hidden=16, progress=False)
    _, err_noise = idd_ops.probe_position_information(no_pos, batches, kinds, steps=150, hidden=16, progress=False)
    assert err_pos < 0.25 * err_noise, (err_pos, err_noise)


def test_probe_is_quiet_unless_asked(capsys):
    batches, kinds = [torch.randn(1, 4, 6, 6)], ["horizontal"]
    idd_ops.probe_position_information(lambda x: x, batches, kinds, steps=3, hidden=4)
    assert capsys.readouterr().err == ""
    idd_ops.probe_position_information(lambda x: x, batches, kinds, steps=3, hidden=4, progress=True)
    lines = capsys.readouterr().err.splitlines(keepends=True)
    # not a terminal here: plain lines (one per 10 % of 3 steps: each step), no redraws
    assert [line.split(" (")[0] for line in lines] == ["probe: 1/3", "probe: 2/3", "probe: 3/3"], lines
    assert all("\r" not in line and ", loss " in line for line in lines)


def test_probe_error_is_the_eval_readouts_mean_over_batches():
    """The error is the mean over every batch of the trained read-out's loss in eval mode (its
    batch norms on their running statistics), not the last batch's or a training-mode one."""
    torch.manual_seed(0)
    kinds = ["horizontal", "gaussian"]
    # batches at different scales, so that each has its own error and batch statistics
    batches = [s * torch.randn(2, 3, 8, 8) + s for s in (0.5, 1.0, 3.0)]
    readout, error = idd_ops.probe_position_information(lambda x: x, batches, kinds, steps=4, hidden=4)
    assert not readout.training
    with torch.no_grad():
        errors = [idd_ops.position_encoding_loss(readout(b), kinds).item() for b in batches]
        readout.train()
        trained_mode = idd_ops.position_encoding_loss(readout(batches[0]), kinds).item()
    assert max(errors) > 1.05 * min(errors) and abs(trained_mode - errors[0]) > 1e-3 * errors[0]
    assert error == pytest.approx(sum(errors) / 3, rel=1e-6)


def test_position_distillation_loss():
    torch.manual_seed(0)
    readout = idd_ops.nn.PositionEncodingModule(6, ["horizontal", "gaussian"], hidden=8)
    pid = idd_ops.nn.PositionDistillationLoss(readout, student_channels=4, teacher_channels=6)
    assert isinstance(pid.adapter, torch.nn.Conv2d)
    fs = torch.randn(2, 4, 8, 8, requires_grad=True)
    ft = torch.randn(2, 6, 16, 16)
    pid.train()
    assert not pid.readout.training  # stays frozen in eval mode
    loss = pid(fs, ft)
    loss.backward()
    assert fs.grad is not None and pid.adapter.weight.grad is not None
    assert all(p.grad is None for p in pid.readout.parameters())
    same = idd_ops.nn.PositionDistillationLoss(readout, student_channels=6)
    f = torch.randn(2, 6, 8, 8)
    assert same(f, f).item() == 0
    # the value, written out: the student's read-out resized bilinearly to the teacher's, MSE
    with torch.no_grad():
        pred_s = torch.nn.functional.interpolate(readout(pid.adapter(fs)), size=(16, 16), mode="bilinear",
                                                 align_corners=False)
        err = (pred_s - readout(ft)).pow(2)
    for reduction, want in (("mean", err.mean()), ("sum", err.sum()), ("none", err)):
        pid.reduction = reduction
        torch.testing.assert_close(pid(fs, ft).detach(), want)
    pid.reduction = "mean"
    target = idd_ops.nn.PositionDistillationLoss(readout, student_channels=4, variant="target")
    out = target(fs)
    out.backward()
    assert out.item() > 0 and target.readout.layers[0].weight.grad is not None


def test_half_sum_accumulates_in_float32():
    """A float16 'sum' over many elements exceeds float16's range; the op keeps float32 until the
    caller's cast, and under autocast the loss stays float32."""
    p = torch.full((4, 1, 256, 256), 2.0, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = idd_ops.position_encoding_loss(p, ["horizontal"], reduction="sum")
    assert loss.dtype == torch.float32
    want = reference.position_encoding_loss(p.double(), ["horizontal"], reduction="sum")
    torch.testing.assert_close(loss.double(), want, rtol=1e-2, atol=0)


def test_probe_trains_under_no_grad_and_inference_mode():
    """Called from evaluation code (no_grad, inference_mode) the probe trained nothing: its
    loss had no grad_fn. It gives the same read-out as a call with gradients on."""
    batches, kinds = [torch.randn(2, 3, 6, 6)], ["horizontal", "vertical"]
    torch.manual_seed(0)
    _, want = idd_ops.probe_position_information(lambda x: x, batches, kinds, steps=3, hidden=4)
    for context in (torch.no_grad, torch.inference_mode):
        torch.manual_seed(0)
        with context():
            _, got = idd_ops.probe_position_information(lambda x: x, batches, kinds, steps=3, hidden=4)
        assert got == want
    with pytest.raises(TypeError, match=r"feature_fn: expected features \[B, C, H, W\] .* batch 0, got dict"):
        idd_ops.probe_position_information(lambda x: {"out": x}, batches, kinds, steps=1, hidden=4)


def test_kinds_must_be_ordered():
    """A set's order changes between processes (string hashing): a read-out saved in one would
    regress other maps in the next. Lists and tuples (and one kind) are taken."""
    pred = idd_ops.position_maps(["horizontal", "vertical"], 6, 8)[None]
    assert idd_ops.position_encoding_loss(pred, ("horizontal", "vertical")).item() == 0
    for call in (lambda k: idd_ops.position_encoding_loss(pred, k), lambda k: idd_ops.position_maps(k, 6, 8),
                 lambda k: idd_ops.nn.PositionEncodingModule(4, k), lambda k: reference.position_encoding_loss(pred, k)):
        with pytest.raises(TypeError, match="kinds: expected a map kind or a list or tuple of them"):
            call({"horizontal", "vertical"})
