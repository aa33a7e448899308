"""What training at scale needs: autocast, batch-level and distributed centroids, determinism,
dynamic shapes under torch.compile, and the drop-in Distiller."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import idd_ops
from idd_ops import reference
from conftest import make_feats, make_labels

LOSSES = {  # name -> (fused call, reference call) on (student, teacher, labels)
    "idd": lambda m, s, t, y: m.inter_class_distance_loss(s, t, y, 4, normalize="mean"),
    "pixel_kd": lambda m, s, t, y: m.pixel_kd_loss(s, t, y, temperature=2.0),
    "cwd": lambda m, s, t, y: m.channel_wise_distillation_loss(s, t),
    "skd": lambda m, s, t, y: m.structural_kd_loss(s, t),
    "ifvd": lambda m, s, t, y: m.intra_class_variation_loss(s, t, y, 4),
    "position": lambda m, s, t, y: m.position_encoding_loss(s[:, :3], ["horizontal", "vertical", "gaussian"]),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_cpu_autocast_bfloat16(name):
    """Under CPU autocast a conv gives bfloat16 features; every loss accepts them, accumulates in
    float32 and returns float32, close to the float32 reference on the same features."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(2, 3, 12, 10)
    t = make_feats(2, 6, 12, 10, dtype=torch.float32, seed=2)
    y = make_labels(2, 24, 20, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = conv(x)
        assert s.dtype == torch.bfloat16
        loss = LOSSES[name](idd_ops, s, t.to(torch.bfloat16), y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    want = LOSSES[name](reference, s.float().detach(), t.to(torch.bfloat16).float(), y)
    # the same bfloat16 values, float32 accumulation on both sides (the losses agree to 4e-7)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference follows the same dtype rule
        assert LOSSES[name](reference, s.detach(), t.to(torch.bfloat16), y).dtype == torch.float32


@pytest.mark.parametrize("name", list(LOSSES))
def test_autocast_leaves_the_ops_arithmetic_alone(device, name):
    """The ops take their inputs as given: float32 features give the same bits inside an autocast
    region as outside, in value and gradient (on CUDA, where the default kernels add with float
    atomics, the same to 1e-6). Autocast reaching the ops' own ATen calls (their GEMMs) would run
    them in bfloat16 (errors near 1e-3), or hand a kernel a bfloat16 buffer where it allocated
    float32 (an error on the GPU)."""
    s = make_feats(2, 6, 16, 12, dtype=torch.float32, seed=1, device=device).requires_grad_()
    t = make_feats(2, 8 if name in ("idd", "skd", "ifvd") else 6, 16, 12, dtype=torch.float32, seed=2, device=device)
    y = make_labels(2, 32, 24, 4, device=device)
    runs = []
    for enabled in (False, True):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled):
            loss = LOSSES[name](idd_ops, s, t, y)
            (grad,) = torch.autograd.grad(loss, s)
        runs.append((loss, grad))
    assert runs[1][0].dtype == torch.float32
    for plain, autocast in zip(runs[0], runs[1]):
        if device == "cpu":
            assert torch.equal(plain, autocast)
        else:
            torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bitwise_deterministic(name):
    s = make_feats(2, 6, 16, 12, dtype=torch.float32, seed=1).requires_grad_()
    t = make_feats(2, 6, 16, 12, dtype=torch.float32, seed=2)
    y = make_labels(2, 32, 24, 4)
    results = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            s.grad = None
            loss = LOSSES[name](idd_ops, s, t, y)
            loss.backward()
            results.append((loss.detach().clone(), s.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(False)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("name", list(LOSSES))
def test_compile_dynamic_shapes(name):
    torch._dynamo.reset()
    fn = torch.compile(lambda s, t, y: LOSSES[name](idd_ops, s, t, y), fullgraph=True, dynamic=True)
    for H, W in ((8, 12), (10, 14)):
        s = make_feats(2, 6, H, W, dtype=torch.float32, seed=1)
        t = make_feats(2, 6, H, W, dtype=torch.float32, seed=2)
        y = make_labels(2, 2 * H, 2 * W, 4)
        torch.testing.assert_close(fn(s, t, y), LOSSES[name](idd_ops, s, t, y))


def test_batch_centroids_match_reference_on_pooled_batch():
    s = make_feats(3, 4, 8, 8, seed=1).requires_grad_()
    t = make_feats(3, 6, 8, 8, seed=2)
    y = make_labels(3, 16, 16, 5)
    loss = idd_ops.inter_class_distance_loss(s, t, y, 5, centroids="batch")
    # the same loss with the batch laid side by side as one wide image
    wide = lambda x: torch.cat(list(x), dim=-1)[None]  # noqa: E731
    want = reference.inter_class_distance_loss(wide(s), wide(t), wide(y), 5)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="process_group"):
        idd_ops.inter_class_distance_loss(s, t, y, 5, process_group=object())


def _ddp_worker(rank, world, port, path, mixed_layouts):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = torch.float32 if mixed_layouts else torch.float64  # float32: the paths' own dtypes differ
    s = make_feats(4, 4, 8, 8, seed=1, dtype=dtype)[2 * rank: 2 * rank + 2].clone().requires_grad_()
    t = make_feats(4, 6, 8, 8, seed=2, dtype=dtype)[2 * rank: 2 * rank + 2]
    if mixed_layouts and rank == 1:  # this rank's class passes take the other path (class sums)
        s = s.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        t = t.contiguous(memory_format=torch.channels_last)
    y = make_labels(4, 16, 16, 5)[2 * rank: 2 * rank + 2]
    loss = idd_ops.inter_class_distance_loss(s, t, y, 5, centroids="batch", process_group=dist.group.WORLD)
    loss.backward()
    # DistributedDataParallel averages gradients over ranks; do the same for the features
    torch.save({"loss": loss.detach(), "grad": s.grad / world}, f"{path}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("mixed_layouts", [False, True], ids=["same-layout", "mixed-layouts"])
def test_distributed_centroids_equal_single_process(tmp_path, mixed_layouts):
    """Mixed layouts: ranks whose features take different paths all-reduce the same dtypes (a
    float32 against a float64 all-reduce once aborted the job in gloo)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), mixed_layouts), nprocs=2, join=True)
    dtype = torch.float32 if mixed_layouts else torch.float64
    s = make_feats(4, 4, 8, 8, seed=1, dtype=dtype).requires_grad_()
    loss = idd_ops.inter_class_distance_loss(s, make_feats(4, 6, 8, 8, seed=2, dtype=dtype), make_labels(4, 16, 16, 5),
                                             5, centroids="batch")
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach())
        torch.testing.assert_close(got["grad"], s.grad[2 * rank: 2 * rank + 2])


class TinySegNet(nn.Module):
    def __init__(self, width, classes=4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("lib", [None, idd_ops.reference, idd_ops], ids=["fused", "reference", "idd_ops"])
def test_a_distiller_copies_and_saves_with_any_lib(lib, tmp_path):
    """The lib is kept as its functions: a module object (idd_ops.reference) made deepcopy,
    pickle and torch.save raise "cannot pickle 'module' object"."""
    import copy
    import pickle

    torch.manual_seed(0)
    d = idd_ops.Distiller(TinySegNet(16), TinySegNet(8), teacher_layer="backbone", student_layer="backbone",
                          num_classes=4, weights={"idd": 1.0, "kd": 1.0}, lib=lib)
    x, y = torch.randn(2, 3, 16, 16), make_labels(2, 16, 16, 4)
    want = d(x, y)[1]["total"]
    torch.save(d, tmp_path / "d.pt")
    for other in (copy.deepcopy(d), pickle.loads(pickle.dumps(d)), torch.load(tmp_path / "d.pt", weights_only=False)):
        torch.testing.assert_close(other(x, y)[1]["total"], want)


class DictSegNet(TinySegNet):
    """A torchvision-style segmentation model: {"out": logits, "aux": ...}."""

    def forward(self, x):
        logits = super().forward(x)
        return {"out": logits, "aux": logits.detach()}


def test_distiller_takes_models_that_return_dicts_and_checks_its_options():
    torch.manual_seed(0)
    teacher, student = DictSegNet(16), DictSegNet(8)
    kw = dict(teacher_layer="backbone", student_layer="backbone", num_classes=4)
    d = idd_ops.Distiller(teacher, student, weights={"idd": 1.0, "kd": 1.0}, **kw)
    x, y = torch.randn(2, 3, 16, 16), make_labels(2, 16, 16, 4)
    out, losses = d(x, y)
    assert set(out) == {"out", "aux"} and losses["kd"] > 0
    plain = idd_ops.Distiller(TinySegNet(16), TinySegNet(8), weights={"idd": 1.0, "kd": 1.0}, **kw)
    plain.load_state_dict(d.state_dict())
    torch.testing.assert_close(plain(x, y)[1]["total"], losses["total"])
    zero = idd_ops.Distiller(teacher, student, weights={}, **kw)(x, y)[1]["total"]
    assert zero.item() == 0 and zero.requires_grad  # backward() works with nothing weighted
    for bad, text in [(dict(weights={"idd": -1.0}), "weights: 'idd' needs a finite weight >= 0"),
                      (dict(weights={"idd": float("nan")}), "finite weight"),
                      (dict(idd_options={"metrc": "cosine"}), "idd_options: unknown options \\['metrc'\\]"),
                      (dict(kd_temperature=0), "kd_temperature"),
                      (dict(num_classes=0), "num_classes")]:
        with pytest.raises(ValueError, match=text):
            idd_ops.Distiller(teacher, student, **{**kw, **bad})
    d.remove_hooks()
    with pytest.raises(RuntimeError, match="no features from the student's layer 'backbone': its hook was removed"):
        d(x, y)


def test_distiller_adds_losses_and_trains_only_the_student():
    torch.manual_seed(0)
    teacher, student = TinySegNet(16), TinySegNet(8)
    readout = idd_ops.nn.PositionEncodingModule(16, ["horizontal", "vertical"], hidden=8)
    pid = idd_ops.nn.PositionDistillationLoss(readout, student_channels=8, teacher_channels=16)
    d = idd_ops.Distiller(teacher, student, teacher_layer="backbone", student_layer="backbone", num_classes=4,
                          weights={"idd": 1.0, "kd": 10.0, "pid": 0.5, "ifvd": 1.0, "skd": 1.0}, pid=pid)
    d.train()
    assert not teacher.training and student.training
    x, y = torch.randn(2, 3, 16, 16), make_labels(2, 16, 16, 4)
    logits, losses = d(x, y)
    assert set(losses) == {"idd", "kd", "pid", "ifvd", "skd", "total"}
    loss = F.cross_entropy(F.interpolate(logits, size=(16, 16)), y, ignore_index=255) + losses["total"]
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert pid.adapter.weight.grad is not None
    with pytest.raises(ValueError, match="not found"):
        idd_ops.Distiller(teacher, student, teacher_layer="backbone", student_layer="nope", num_classes=4)
    with pytest.raises(ValueError, match="pid"):
        idd_ops.Distiller(teacher, student, teacher_layer="backbone", student_layer="backbone", num_classes=4,
                          weights={"pid": 1.0})


@pytest.mark.parametrize("mode", ["never", "distiller.train()", "teacher.train()"])
def test_distiller_keeps_the_teacher_frozen(mode):
    """Construction freezes the teacher: after training steps its parameters and BatchNorm buffers
    are bit-identical, whether or not distiller.train() (or even teacher.train()) was called."""
    torch.manual_seed(0)
    teacher, student = TinySegNet(16), TinySegNet(8)
    assert teacher.training  # a new module starts in training mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = idd_ops.Distiller(teacher, student, teacher_layer="backbone", student_layer="backbone", num_classes=4,
                          weights={"idd": 1.0, "kd": 10.0})
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    if mode == "distiller.train()":
        d.train()
    elif mode == "teacher.train()":
        teacher.train()
    # every parameter handed to the optimiser, weight decay and momentum included: a frozen one has no grad
    optimizer = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    student_before = [p.clone() for p in student.parameters()]
    for step in range(3):
        x, y = torch.randn(2, 3, 16, 16), make_labels(2, 16, 16, 4, seed=step)
        logits, losses = d(x, y)
        loss = F.cross_entropy(F.interpolate(logits, size=(16, 16)), y, ignore_index=255) + losses["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert not teacher.training and not teacher.backbone[1].training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert student.backbone[1].num_batches_tracked.item() == 3  # the student's BatchNorm did train
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), student_before))


def _relu_net(width, inplace):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=inplace),
                         nn.Conv2d(width, 4, 1))


def test_distiller_refuses_features_changed_in_place_after_its_layer():
    """Hooking a BatchNorm that a ReLU(inplace=True) follows kept the ReLU's output: the loss was
    silently that of other features than the named layer's (0.0047 against 0.0201 here)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8), make_labels(2, 8, 8, 4)
    for layer, inplace in (("1", False), ("2", True)):  # the BatchNorm out of place, the ReLU itself
        d = idd_ops.Distiller(_relu_net(8, inplace), _relu_net(4, inplace), teacher_layer=layer, student_layer=layer,
                              num_classes=4)
        assert d(x, y)[1]["idd"] > 0
    d = idd_ops.Distiller(_relu_net(8, True), _relu_net(4, True), teacher_layer="1", student_layer="1", num_classes=4)
    with pytest.raises(RuntimeError, match="student's layer '1': its output was changed in place"):
        d(x, y)


def test_distiller_warns_when_the_student_features_carry_no_gradient():
    """A student under reentrant checkpointing makes its hooked features under no_grad: the
    feature losses then gave no gradient, silently."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, net, reentrant):
            super().__init__()
            self.net, self.reentrant = net, reentrant

        def forward(self, x):
            return checkpoint(self.net, x.requires_grad_(), use_reentrant=self.reentrant)

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8), make_labels(2, 8, 8, 4)
    kw = dict(teacher_layer="2", student_layer="net.2", num_classes=4)
    with pytest.warns(UserWarning, match="do not require grad.*use_reentrant=True"):
        idd_ops.Distiller(_relu_net(8, False), Checkpointed(_relu_net(4, False), True), **kw)(x, y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = idd_ops.Distiller(_relu_net(8, False), Checkpointed(_relu_net(4, False), False), **kw)
        assert d(x, y)[1]["idd"].requires_grad
        with torch.no_grad():  # evaluation: no warning
            d(x, y)


def test_distiller_checks_weights_and_temperature_by_name():
    torch.manual_seed(0)
    np = pytest.importorskip("numpy")
    kw = dict(teacher_layer="backbone", student_layer="backbone", num_classes=4)
    d = idd_ops.Distiller(TinySegNet(8), TinySegNet(4), weights={"idd": np.float32(0.5)}, **kw)
    assert d.weights == {"idd": 0.5} and type(d.weights["idd"]) is float
    with pytest.raises(TypeError, match="weights: 'idd' needs a real number .* got str"):
        idd_ops.Distiller(TinySegNet(8), TinySegNet(4), weights={"idd": "1"}, **kw)
    for temperature in (1e-300, 1e20):  # 1 / T, then T^2, infinite in float32
        with pytest.raises(ValueError, match="kd_temperature: expected a value in "):
            idd_ops.Distiller(TinySegNet(8), TinySegNet(4), weights={"kd": 1.0}, kd_temperature=temperature, **kw)
    with pytest.raises(TypeError, match="temperature: expected a Python int or float > 0, got Tensor"):
        idd_ops.nn.PixelKDLoss(torch.tensor(2.0))


def test_a_distiller_compiles_whole():
    """torch.compile(fullgraph=True) takes the Distiller, hooks included (its in-place check
    reads a version counter that torch.compile cannot guard on: eager only)."""
    torch.manual_seed(0)
    d = idd_ops.Distiller(_relu_net(8, False), _relu_net(4, False), teacher_layer="2", student_layer="2",
                          num_classes=4, weights={"idd": 1.0, "kd": 1.0})
    x, y = torch.randn(2, 3, 8, 8), make_labels(2, 8, 8, 4)
    want = d(x, y)[1]["total"]
    got = torch.compile(d, backend="aot_eager", fullgraph=True)(x, y)[1]["total"]
    torch.testing.assert_close(got, want)
    got.backward()
