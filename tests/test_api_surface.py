"""The package's surface: one-way layering (the reference runs without the compiled library),
the position codes shared with C++, a library without debug information, typed and consistently
named functions, the Distiller's options, and strict argument checks that name the argument."""
import ast
import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import idd_ops

PKG = pathlib.Path(idd_ops.__file__).parent


def test_reference_imports_without_the_compiled_library():
    code = ("import sys; sys.modules['idd_ops._C'] = None\n"  # makes `import idd_ops._C` fail
            "import torch; from idd_ops import reference\n"
            "x = torch.randn(1, 3, 4, 4)\n"
            "print(float(reference.pixel_kd_loss(x, x)))\n"
            "import idd_ops\n"
            "try:\n    idd_ops.pixel_kd_loss\nexcept ImportError as e:\n    print('ImportError', e)\n")
    root = str(PKG.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert float(lines[0]) == 0.0
    assert lines[1].startswith("ImportError idd_ops.pixel_kd_loss needs the compiled library")


def _imports(path):
    """(module names imported at top level, imports found inside functions) of one file."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            top |= {base} if node.module else {f"{base}{a.name}" for a in node.names}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return top, nested


def test_one_way_layering():
    files = sorted(PKG.glob("*.py"))
    for path in files:
        top, nested = _imports(path)
        assert not nested, f"{path.name}: imports inside a function"
        if path.name != "__init__.py":
            assert "." + "reference" not in top, f"{path.name} imports the reference"
            assert "idd_ops" not in top, f"{path.name} imports its own package"
    # the reference and the private modules it uses need torch (and the standard library) alone
    torch_only = {"reference.py", "_dtypes.py", "_reduction.py", "_position_maps.py", "_nearest.py"}
    for name in torch_only:
        top, _ = _imports(PKG / name)
        for module in top:
            assert module.split(".")[0] in {"torch", "math", "typing", "collections"} or module.lstrip(".") + ".py" in torch_only, \
                f"{name} imports {module}"
    # dtype policy and distributed pooling are private, not in the public functional module
    defined = {n.name for n in ast.parse((PKG / "functional.py").read_text()).body if isinstance(n, ast.FunctionDef)}
    assert defined == {"class_centroids", "class_distance_matrix", "inter_class_distance_loss"}


def test_position_codes_come_from_the_cpp_table():
    from idd_ops import _position_maps, position

    codes = position.CODES
    assert sorted(codes) == sorted(_position_maps.ELEMENTS)
    assert sorted(codes.values()) == list(range(len(codes)))
    with pytest.raises(ValueError, match="unknown elementary position map 'diagonal'"):
        torch.ops.idd_ops._position_map_code("diagonal")
    # every elementary map the kernel generates equals the Python one (zero loss against it)
    kinds = list(_position_maps.KINDS)
    maps = idd_ops.position_maps(kinds, 7, 9, dtype=torch.float64, num_stripes=3, sigma=0.3)
    loss = idd_ops.position_encoding_loss(maps[None], kinds, reduction="none", num_stripes=3, sigma=0.3)
    assert loss.abs().max() < 1e-24


@pytest.mark.skipif(os.environ.get("IDD_OPS_DEBUG_INFO") == "1", reason="built with debug information on purpose")
def test_library_is_built_without_debug_information():
    """setup.py leaves out the -g of Python's compiler flags: with it the library was 61 MB
    instead of 2 and took twice as long to compile."""
    import idd_ops._C as library
    assert b".debug_info" not in pathlib.Path(library.__file__).read_bytes()


def test_public_api_is_typed_and_named_consistently():
    assert (PKG / "py.typed").exists()
    assert "py.typed" in (PKG.parent / "setup.py").read_text()
    allowed_tensors = {"feats", "student_feats", "teacher_feats", "student_logits", "teacher_logits", "labels",
                       "centroids", "counts", "pred_maps"}
    for name in ["class_centroids", "class_distance_matrix", "inter_class_distance_loss", "position_maps",
                 "position_encoding_loss", "probe_position_information", "pixel_kd_loss",
                 "channel_wise_distillation_loss", "structural_kd_loss", "intra_class_variation_loss"]:
        sig = inspect.signature(getattr(idd_ops, name))
        assert sig.return_annotation is not inspect.Signature.empty, name
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name})"
        tensors = [p for p in sig.parameters if p in allowed_tensors or p in {"features", "pred", "x"}]
        assert set(tensors) <= allowed_tensors, f"{name}: {tensors}"


def test_distiller_takes_layers_by_keyword():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(TypeError):
        idd_ops.Distiller(model, model, "0", "0", 4)
    d = idd_ops.Distiller(model, model, teacher_layer="0", student_layer="0", num_classes=4)
    assert d.lib.inter_class_distance_loss is idd_ops.inter_class_distance_loss


def test_distiller_passes_its_options_on():
    """Each weighted loss equals its function called on the hooked features and logits with the
    Distiller's options (a dropped idd_options, kd_temperature or kd_ignore changes the value)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(6, 3, 1))
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 3, 1))
    x = torch.randn(2, 3, 6, 6)
    y = torch.randint(0, 3, (2, 6, 6))
    y[:, :2] = 255
    options = dict(metric="cosine", normalize="mean")
    d = idd_ops.Distiller(teacher, student, teacher_layer="0", student_layer="0", num_classes=3,
                          weights={"idd": 0.5, "kd": 2.0}, idd_options=options, kd_temperature=3.0, kd_ignore=True)
    _, losses = d(x, y)
    with torch.no_grad():
        fs, ft = student[0](x), teacher[0](x)
        ls, lt = student(x), teacher(x)
    idd = idd_ops.inter_class_distance_loss(fs, ft, y, 3, **options)
    kd = idd_ops.pixel_kd_loss(ls, lt, y, temperature=3.0)
    torch.testing.assert_close(losses["idd"].detach(), 0.5 * idd)
    torch.testing.assert_close(losses["kd"].detach(), 2.0 * kd)
    assert idd != idd_ops.inter_class_distance_loss(fs, ft, y, 3)
    assert kd != idd_ops.pixel_kd_loss(ls, lt, temperature=3.0) and kd != idd_ops.pixel_kd_loss(ls, lt, y)
    torch.testing.assert_close(losses["total"].detach(), 0.5 * idd + 2.0 * kd)


S, T, Y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))


@pytest.mark.parametrize("call,exc,text", [
    (lambda: idd_ops.inter_class_distance_loss(S, T, Y, 3, eps=True), TypeError, "eps"),
    (lambda: idd_ops.inter_class_distance_loss(S, T, Y, True), TypeError, "num_classes"),
    (lambda: idd_ops.intra_class_variation_loss(S, T, Y, 3, eps=True), TypeError, "eps"),
    (lambda: idd_ops.pixel_kd_loss(S, T, temperature=True), TypeError, "temperature"),
    (lambda: idd_ops.channel_wise_distillation_loss(S, T, temperature="4"), TypeError, "temperature"),
    (lambda: idd_ops.structural_kd_loss(S, T, pool=True), TypeError, "pool"),
    (lambda: idd_ops.structural_kd_loss(S, T, pool=2.0), TypeError, "pool"),
    (lambda: idd_ops.pixel_kd_loss(S, T, Y, ignore_index=None), TypeError, "ignore_index"),
    (lambda: idd_ops.pixel_kd_loss(S, T, 2.0), TypeError, "labels"),
    (lambda: idd_ops.class_distance_matrix(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)),
     TypeError, "centroids"),
    (lambda: idd_ops.position_maps("horizontal", 4, 4, num_stripes=True), TypeError, "num_stripes"),
    (lambda: idd_ops.position_maps("gaussian", 4, 4, sigma=True), TypeError, "sigma"),
    (lambda: idd_ops.structural_kd_loss(S, T, reduction="avg"), ValueError, "reduction"),
    (lambda: idd_ops.inter_class_distance_loss(S.to_sparse(), T, Y, 3), TypeError,
     "student_feats: expected a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
])
def test_strict_checks(call, exc, text):
    with pytest.raises(exc, match=text):
        call()


def test_teacher_requiring_grad_is_rejected_when_the_op_is_called():
    s = torch.randn(2, 5, 7, requires_grad=True)
    t = torch.randn(2, 5, 7, requires_grad=True)
    with pytest.raises(RuntimeError, match="teacher input requires grad"):
        torch.ops.idd_ops.softmax_kl(s, t, 1.0)  # no backward needed to see the error
    with pytest.raises(RuntimeError, match="teacher input requires grad"):
        torch.ops.idd_ops.affinity_loss(s[..., None], t[..., None], 1)
    with torch.no_grad():  # no gradient to miss: no error
        torch.ops.idd_ops.softmax_kl(s, t, 1.0)
        torch.ops.idd_ops.affinity_loss(s[..., None], t[..., None], 1)


def test_building_blocks_check_their_arguments():
    """The Distiller's IDD option values and module types, PID's modules, the probe and
    position_maps say which argument is wrong when built or called (a wrong value once failed
    only at the first forward, or deep inside a conv)."""
    conv = torch.nn.Conv2d(3, 4, 1)
    readout = idd_ops.nn.PositionEncodingModule(16, ["horizontal"], hidden=8)
    batches = [torch.randn(1, 3, 8, 8)]
    cases = [
        (ValueError, "metric", lambda: idd_ops.Distiller(conv, conv, teacher_layer="", student_layer="", num_classes=3,
                                                         idd_options={"metric": "l1"})),
        (TypeError, "kd_ignore", lambda: idd_ops.Distiller(conv, conv, teacher_layer="", student_layer="",
                                                           num_classes=3, kd_ignore="no")),
        (TypeError, "pid", lambda: idd_ops.Distiller(conv, conv, teacher_layer="", student_layer="", num_classes=3,
                                                     weights={"pid": 1.0}, pid=torch.nn.Identity())),
        (TypeError, "student_channels", lambda: idd_ops.nn.PositionDistillationLoss(readout, True, 16)),
        (ValueError, "teacher_channels", lambda: idd_ops.nn.PositionDistillationLoss(readout, 8, 12)),
        (TypeError, "readout", lambda: idd_ops.nn.PositionDistillationLoss(conv, 8)),
        (ValueError, "hidden", lambda: idd_ops.nn.PositionEncodingModule(16, ["horizontal"], hidden=0)),
        (ValueError, "steps", lambda: idd_ops.probe_position_information(conv, batches, "horizontal", steps=0)),
        (TypeError, "steps", lambda: idd_ops.probe_position_information(conv, batches, "horizontal", steps=2.0)),
        (ValueError, "lr", lambda: idd_ops.probe_position_information(conv, batches, "horizontal", lr=0)),
        (TypeError, "height", lambda: idd_ops.position_maps("horizontal", 8.0, 8)),
        (ValueError, "height", lambda: idd_ops.position_maps("horizontal", -1, 8)),
    ]
    for error, name, build in cases:
        with pytest.raises(error, match=f"^{name}"):
            build()


def test_star_import_of_the_modules_brings_only_modules():
    namespace = {}
    exec("from idd_ops.nn import *", namespace)
    assert {k for k in namespace if not k.startswith("__")} == set(idd_ops.nn.__all__)
    assert "F" not in namespace and "torch" not in namespace
