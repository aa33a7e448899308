"""A copy of the package without its compiled library gives one clear ImportError: at import when
it hides an installed copy (a source tree in the current directory), at first use of a fused
name when no other copy exists. Each case runs in a child process on a temporary copy of the
package."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import idd_ops

PKG = pathlib.Path(idd_ops.__file__).parent
BUILD = "pip install --no-build-isolation -e ."


def _copy_package(dest, with_library):
    shutil.copytree(PKG, dest / "idd_ops", ignore=shutil.ignore_patterns("_C.*", "_C-*", "__pycache__"))
    if with_library:
        for lib in PKG.glob("_C.*"):
            (dest / "idd_ops" / lib.name).symlink_to(lib)


def _run(args, cwd, pythonpath=""):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_source_tree_hiding_an_installed_copy_says_so_at_import(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    _copy_package(src, with_library=False)
    _copy_package(site, with_library=True)  # "installed": on PYTHONPATH, behind the current directory
    for args in (["-c", "import idd_ops"], ["-m", "idd_ops.demo.cli", "--help"]):
        out = _run(args, cwd=src, pythonpath=str(site))
        assert out.returncode != 0, out.stdout
        errors = [line for line in out.stderr.splitlines() if line[:1].isalpha() and "Error" in line.split(":")[0]]
        assert len(errors) == 1 and errors[0].startswith("ImportError: "), out.stderr  # one error, no RuntimeError
        message = errors[0]
        assert f"imported from {(src / 'idd_ops').resolve()}, which has no compiled library" in message
        assert "hides the idd_ops installed at " in message and str((site / "idd_ops").resolve()) in message
        assert "cd elsewhere" in message and BUILD in message
    # from another directory the installed copy is the one imported, and it works
    out = _run(["-c", "import idd_ops, torch; print(idd_ops.__file__); "
                      "print(float(idd_ops.pixel_kd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))))"],
               cwd=tmp_path, pythonpath=str(site))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "idd_ops" / "__init__.py"), "0.0"]


# The child sees no installed idd_ops: package metadata finds none, and sys.path keeps no folder
# holding another idd_ops (torch is imported first, so site-packages may go).
_NOTHING_INSTALLED = """
import importlib.metadata, os, sys
import torch
def _not_found(name):
    raise importlib.metadata.PackageNotFoundError(name)
importlib.metadata.distribution = _not_found
sys.path[:] = [p for p in sys.path if p == '' or not os.path.isdir(os.path.join(p, 'idd_ops'))]
"""


def test_unbuilt_package_names_the_build_command(tmp_path):
    _copy_package(tmp_path, with_library=False)
    code = _NOTHING_INSTALLED + """
import idd_ops
x = torch.randn(1, 3, 4, 4)
print(float(idd_ops.reference.pixel_kd_loss(x, x)))  # the reference works without the library
for attempt in (lambda: idd_ops.pixel_kd_loss, lambda: __import__('idd_ops.functional')):
    try:
        attempt()
    except ImportError as e:
        print('ImportError', e)
"""
    out = _run(["-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "0.0" and len(lines) == 3, out.stdout
    not_built = f"the compiled library of idd_ops is not built ({(tmp_path / 'idd_ops').resolve()} has no _C extension)"
    assert lines[1].startswith(f"ImportError idd_ops.pixel_kd_loss needs the compiled library: {not_built}")
    assert lines[2].startswith(f"ImportError {not_built}")  # not register_fake's RuntimeError
    assert BUILD in lines[1] and BUILD in lines[2]


@pytest.mark.parametrize("source_tree", [True, False])
def test_library_older_than_the_python_code_names_the_build_command(tmp_path, source_tree):
    """A library built before the ops' autograd moved into it (an editable install pulled without a
    rebuild) loads but would drop every gradient: it is refused with the build command, in place
    for a source tree, and for an installed copy (no source beside it) a reinstall that bypasses
    pip's cache of wheels built against the old torch."""
    _copy_package(tmp_path, with_library=True)
    if source_tree:
        (tmp_path / "setup.py").write_text("")
    code = _NOTHING_INSTALLED + """
has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
torch._C._dispatch_has_kernel_for_dispatch_key = lambda op, key: key != "Autograd" and has_kernel(op, key)
import idd_ops
try:
    idd_ops.pixel_kd_loss
except ImportError as e:
    print('ImportError', e)
"""
    out = _run(["-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError idd_ops.pixel_kd_loss needs the compiled library: the compiled library "
                                 f"of idd_ops in {(tmp_path / 'idd_ops').resolve()} is older than"), out.stdout
    if source_tree:
        assert BUILD in out.stdout
    else:
        assert BUILD not in out.stdout and "--force-reinstall --no-cache-dir <source>" in out.stdout
