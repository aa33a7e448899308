"""tools/prebuilt_cuda.py: the CUDA library built here is used on the GPU machine only where its
stamp names the same sources and the same torch; anything else leaves the tree alone, and
tools/gpu_check.sh's build stage then builds."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import idd_ops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import prebuilt_cuda  # noqa: E402

IDENTITY = {"torch": "2.11.0+cu130", "torch_git": "abc123"}


def _tree(path):
    """A source tree: csrc/ with a source, a header and a non-source file, setup.py, idd_ops/."""
    (path / "csrc" / "cuda").mkdir(parents=True)
    (path / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    (path / "csrc" / "ops.h").write_text("#pragma once\n")
    (path / "csrc" / "cpu").mkdir()
    (path / "csrc" / "cpu" / "vec.inc").write_text("// included by a kernel source\n")
    (path / "setup.py").write_text("# setup\n")
    (path / "idd_ops").mkdir()
    return path


def _stamped(path, **changes):
    """A tree with a prebuilt library whose stamp fits it (changes: stamp fields to override)."""
    root = _tree(path)
    folder = root / prebuilt_cuda.FOLDER
    folder.mkdir()
    (folder / "_C.abi3.so").write_bytes(b"cuda library")
    stamp = {"library": "_C.abi3.so", "fingerprint": prebuilt_cuda.fingerprint(root), "revision": "r1",
             "archs": "9.0", "built": "today", "python": "Python 3.12.1", **IDENTITY, **changes}
    (folder / "stamp.json").write_text(json.dumps(stamp))
    return root


def test_fingerprint_follows_the_build_inputs_only(tmp_path):
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert prebuilt_cuda.fingerprint(a) == prebuilt_cuda.fingerprint(b)  # not the folder's place
    (b / "idd_ops" / "api.py").write_text("x = 1\n")
    (b / "README.md").write_text("docs\n")
    assert prebuilt_cuda.fingerprint(a) == prebuilt_cuda.fingerprint(b)
    for edit in (b / "csrc" / "cuda" / "k.cu", b / "csrc" / "ops.h", b / "csrc" / "cpu" / "vec.inc", b / "setup.py"):
        before = prebuilt_cuda.fingerprint(b)
        edit.write_text(edit.read_text() + "// changed\n")
        assert prebuilt_cuda.fingerprint(b) != before, edit
    (b / "csrc" / "new.cuh").write_text("")
    assert prebuilt_cuda.fingerprint(b) != before  # a new header counts too


def test_a_fitting_library_replaces_the_one_in_the_package(tmp_path):
    root = _stamped(tmp_path, archs="8.0;9.0+PTX")
    (root / "idd_ops" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"cpu library")
    assert prebuilt_cuda.use(root, identity=dict(IDENTITY, gpu_arch="9.0")) == 0
    assert [p.name for p in (root / "idd_ops").glob("_C*.so")] == ["_C.abi3.so"]
    assert (root / "idd_ops" / "_C.abi3.so").read_bytes() == b"cuda library"


@pytest.mark.parametrize("case", ["other sources", "other torch", "other torch build", "other GPU", "no stamp",
                                  "no library"])
def test_a_library_that_does_not_fit_changes_nothing(tmp_path, capsys, case):
    root = _stamped(tmp_path, **{"other torch": {"torch": "2.12.0+cu130"},
                                 "other torch build": {"torch_git": "def456"},
                                 "no library": {"library": "_C.other.so"}}.get(case, {}))
    if case == "other sources":
        (root / "csrc" / "ops.h").write_text("#pragma once\n// edited after the build\n")
    if case == "no stamp":
        (root / prebuilt_cuda.FOLDER / "stamp.json").unlink()
    identity = dict(IDENTITY, gpu_arch="8.0" if case == "other GPU" else "9.0")  # the stamp: archs 9.0
    assert prebuilt_cuda.use(root, identity=identity) == prebuilt_cuda.NO_MATCH
    assert list((root / "idd_ops").iterdir()) == []
    reason = capsys.readouterr().out
    assert "not used" in reason and {"other sources": "other sources", "other torch": "2.12.0",
                                     "other torch build": "def456", "other GPU": "this GPU has 8.0",
                                     "no stamp": "missing", "no library": "_C.other.so"}[case] in reason


def test_check_changes_nothing_and_sources_only_leaves_torch_out(tmp_path):
    root = _stamped(tmp_path, torch="2.13.0+cpu")
    assert prebuilt_cuda.use(root, check=True, identity=IDENTITY) == prebuilt_cuda.NO_MATCH
    assert prebuilt_cuda.use(root, check=True, sources_only=True) == 0
    assert list((root / "idd_ops").iterdir()) == []


def test_the_stamp_a_build_writes_is_one_use_accepts(tmp_path, monkeypatch):
    """build() end to end with the compile faked: the library of the build's copy of the tree and
    a stamp that names that copy's sources and the venv's torch."""
    root, work = _tree(tmp_path / "repo"), tmp_path / "work"
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs.get("env", {})))
        if cmd[0] == "bash":  # the build: a copy of the tree with its library
            shutil.copytree(root, work / "src")
            (work / "src" / "idd_ops" / "_C.abi3.so").write_bytes(b"built")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[0] == "git":
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[-1] == "-V":
            return subprocess.CompletedProcess(cmd, 0, "Python 3.12.1\n", "")
        return subprocess.CompletedProcess(cmd, 0, f"{IDENTITY['torch']}\n{IDENTITY['torch_git']}\n", "")

    work.mkdir()
    monkeypatch.setattr(prebuilt_cuda.subprocess, "run", fake_run)
    assert prebuilt_cuda.build("2.11.0", "python3.12", "9.0", work=work, root=root) == 0
    env = calls[0][1]
    assert calls[0][0][-2:] == ["2.11.0", "python3.12"]
    assert env["BUILD_ONLY"] == "1" and env["FORCE_CUDA"] == "1" and env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    stamp = json.loads((root / prebuilt_cuda.FOLDER / "stamp.json").read_text())
    assert stamp["torch"] == IDENTITY["torch"] and stamp["archs"] == "9.0" and stamp["library"] == "_C.abi3.so"
    monkeypatch.undo()
    assert prebuilt_cuda.use(root, identity=IDENTITY) == 0
    assert (root / "idd_ops" / "_C.abi3.so").read_bytes() == b"built"


def test_use_from_the_command_line_here(tmp_path):
    """This checkout: the command runs and answers 0 or 3 (a stale or absent library is normal)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "prebuilt_cuda.py"), "use", "--check",
                           "--sources-only"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode in (0, prebuilt_cuda.NO_MATCH), proc.stderr
    assert "prebuilt CUDA library" in proc.stdout


def test_the_built_record_follows_the_sources(tmp_path, capsys):
    """gpu_check.sh rebuilds (or reinstalls) on a warm machine when the sources changed since the
    library in idd_ops/ was made: the record its build stage writes says so."""
    root = _tree(tmp_path)
    loads, fails = (lambda root: True), (lambda root: False)
    assert prebuilt_cuda.built(root, loaded=loads) == 1 and "no record" in capsys.readouterr().out
    assert prebuilt_cuda.built(root, record=True) == 0 and prebuilt_cuda.built(root, loaded=loads) == 0
    assert prebuilt_cuda.built(root, loaded=fails) == 1 and "no CUDA kernels" in capsys.readouterr().out
    (root / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() { /* fixed */ }\n")
    assert prebuilt_cuda.built(root, loaded=loads) == 1 and "other sources" in capsys.readouterr().out
    assert prebuilt_cuda.cuda_loaded(ROOT) == idd_ops.cuda_available()  # this checkout, in a child process
