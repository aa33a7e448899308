"""The CUDA sources build with the real build's nvcc flags (compile only: no GPU needed), and
every op has a kernel for every device."""
import glob
import importlib.util
import os
import re

import pytest
import torch

import idd_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("nvcc_check", os.path.join(ROOT, "tools", "nvcc_check.py"))
nvcc_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nvcc_check)


@pytest.fixture(scope="module")
def compiled():
    """Every source compiled in one unit, or one by one where the unit fails (tools/nvcc_check.py
    --unity; cached across runs by content and flags)."""
    return nvcc_check.check_all(unity=True)


@pytest.mark.skipif(nvcc_check.find_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", nvcc_check.SOURCES, ids=[os.path.basename(s) for s in nvcc_check.SOURCES])
def test_nvcc_compiles(source, compiled):
    ok, message, _ = compiled[source]
    assert ok, message


@pytest.mark.skipif(nvcc_check.find_nvcc() is None, reason="nvcc not found")
def test_a_failing_unit_is_decided_file_by_file(tmp_path, monkeypatch):
    """A unit with a bad file and a name that two good files both define is decided file by
    file: only the bad file fails, with the compiler's message."""
    monkeypatch.setattr(nvcc_check, "CACHE", str(tmp_path / "cache"))
    bodies = {"good.cu": "__global__ void good(float* x) { x[0] = 1; }",
              "bad.cu": "__global__ void bad(float* x) { x[0] = undeclared; }",
              "clash_a.cu": "static int clash() { return 1; }\nint use_a() { return clash(); }",
              "clash_b.cu": "static int clash() { return 2; }\nint use_b() { return clash(); }"}
    for name, body in bodies.items():
        (tmp_path / name).write_text(body + "\n")
    results = nvcc_check.check_all([str(tmp_path / name) for name in bodies], unity=True)
    assert {os.path.basename(s): ok for s, (ok, _, _) in results.items()} == {
        "good.cu": True, "bad.cu": False, "clash_a.cu": True, "clash_b.cu": True}
    assert "undeclared" in results[str(tmp_path / "bad.cu")][1]


def _impls(pattern, key):
    """Op names registered under dispatch key `key` in the files matching `pattern`."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", pattern)):
        text = open(path).read()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(idd_ops,\s*" + key + r",\s*m\)\s*\{([^{}]*)\}", text):
            names.update(re.findall(r'm\.impl\("(\w+)"', block))
    return names


def test_every_op_has_a_kernel_for_every_device():
    schemas = set(re.findall(r'm\.def\("(\w+)\(', open(os.path.join(ROOT, "csrc", "idd_ops.cpp")).read()))
    cpu, cuda = _impls("cpu/*.cpp", "CPU"), _impls("cuda/*.cu", "CUDA")
    composite = _impls("composite/*.cpp", "CompositeExplicitAutograd")
    assert len(schemas) >= 15
    # a fused CUDA kernel may stand in for a composite op, which every other device runs
    assert cpu == cuda - composite, f"CPU-only: {sorted(cpu - cuda)}, CUDA-only: {sorted(cuda - cpu - composite)}"
    assert not (cpu & composite)
    assert cpu | composite == schemas, f"no kernel: {sorted(schemas - cpu - composite)}"


def test_every_differentiable_op_has_a_cpp_autograd_kernel():
    """Each op with a backward op (a schema _<op>_backward; _<op>_slots_backward for the slot form)
    registers its autograd in csrc/autograd/, and that kernel is the loaded library's active one."""
    schemas = set(re.findall(r'm\.def\("(\w+)\(', open(os.path.join(ROOT, "csrc", "idd_ops.cpp")).read()))
    differentiable = {name[1:-len("_backward")] for name in schemas if name.endswith("_backward")}
    differentiable = {name if name in schemas else "_" + name for name in differentiable}
    differentiable.add("class_sums_pair")  # _class_sums_backward serves class_sums and the pair
    differentiable.add("_ifvd_maps")  # its backward is _pixel_centroid_cosine_slots_backward's
    assert _impls("autograd/*.cpp", "Autograd") == differentiable
    for name in differentiable:
        active = [line for line in torch._C._dispatch_dump(f"idd_ops::{name}").splitlines()
                  if line.startswith("Autograd[alias]")]
        assert len(active) == 1 and "csrc/autograd/" in active[0], (name, active)


def test_compiled_library_matches_the_sources():
    """The loaded library registers a CPU (or composite) kernel for every schema."""
    for name in re.findall(r'm\.def\("(\w+)\(', open(os.path.join(ROOT, "csrc", "idd_ops.cpp")).read()):
        op = f"idd_ops::{name}"
        assert any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k)
                   for k in ("CPU", "CompositeExplicitAutograd")), op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_kernels_are_built_where_a_gpu_is_visible():
    """On a GPU machine a build that skipped CUDA (e.g. no CUDA_HOME) fails here, not silently."""
    assert idd_ops.cuda_available(), "a GPU is visible but idd_ops was built without its CUDA kernels"
