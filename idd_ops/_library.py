"""Loading the compiled library (idd_ops._C), and one clear ImportError where it cannot load.

Three ways it fails, each with its own message and what to do:
- this package has no compiled library while another idd_ops that has one is installed: the
  source tree (Python puts the current or the script's folder first on sys.path) hides the
  installed package. Raised at ``import idd_ops``: what the user wanted is the other copy.
- no compiled library anywhere: not built yet.
- a compiled library that does not load (e.g. built against another torch), or one built
  before this Python code (no autograd kernels: its gradients would be dropped).
In the last two cases ``import idd_ops`` succeeds so that ``idd_ops.reference`` (torch alone)
stays usable; every fused name and every module that needs the ops raises the same ImportError.
"""
import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import List, Optional
from urllib.parse import unquote, urlparse

import torch

HERE = Path(__file__).resolve().parent
BUILD = "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"

# None once the library has loaded; the ImportError to raise otherwise (set by load()).
ERROR: Optional[ImportError] = None


def has_library(folder: Path) -> bool:
    return any((folder / f"_C{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _installed_folders() -> List[Path]:
    """Where package metadata says an idd_ops is installed (a wheel's folder, or an editable
    install's source tree)."""
    try:
        dist = importlib.metadata.distribution("idd_ops")
    except importlib.metadata.PackageNotFoundError:
        return []
    folders = [Path(str(dist.locate_file("idd_ops")))]
    try:  # PEP 610: an editable or local install records its source folder
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    except ValueError:
        url = ""
    if url.startswith("file:"):
        folders.append(Path(unquote(urlparse(url).path)) / "idd_ops")
    return folders


def other_copies() -> List[Path]:
    """Other idd_ops package folders that have a compiled library: installed ones and any on sys.path."""
    candidates = _installed_folders() + [Path(entry or os.getcwd()) / "idd_ops" for entry in sys.path]
    found = []
    for folder in candidates:
        try:
            folder = folder.resolve()
        except OSError:
            continue
        if folder != HERE and folder not in found and has_library(folder):
            found.append(folder)
    return found


def _source_tree_hint() -> str:
    root = HERE.parent
    return f" from the source tree ({root})" if (root / "setup.py").is_file() else ""


def _rebuild() -> str:
    """How to rebuild this copy: in place in a source tree; an installed copy (no source beside
    it) is reinstalled from its source, without pip's cache, which would hand back the wheel it
    built against the old torch."""
    if (HERE.parent / "setup.py").is_file():
        return f"rebuild it{_source_tree_hint()} with {BUILD}"
    return ("reinstall it from the idd_ops source (a clone or an sdist) with `pip install --no-build-isolation "
            "--force-reinstall --no-cache-dir <source>`")


def load() -> None:
    """Import idd_ops._C (registers torch.ops.idd_ops). Raises ImportError when a library-less
    copy of the package hides an installed one; otherwise records any failure in ERROR."""
    global ERROR
    if not has_library(HERE):
        others = other_copies()
        if others:
            where = ", ".join(str(p) for p in others)
            raise ImportError(
                f"idd_ops was imported from {HERE}, which has no compiled library, and this copy hides the "
                f"idd_ops installed at {where}: Python looks in the current directory (or the script's) first. "
                f"To use the installed package, run from another directory (cd elsewhere). To use this "
                f"source tree, build it in place{_source_tree_hint()}: {BUILD}.")
        ERROR = ImportError(f"the compiled library of idd_ops is not built ({HERE} has no _C extension). "
                            f"Build it{_source_tree_hint()} with torch installed: {BUILD}. Without it only "
                            "idd_ops.reference (plain PyTorch) works.")
        return
    try:
        importlib.import_module("idd_ops._C")
    except ImportError as error:
        ERROR = ImportError(f"the compiled library of idd_ops in {HERE} did not load ({error}). It must be built "
                            f"against the installed torch ({torch.__version__}): {_rebuild()}. Without it only "
                            "idd_ops.reference (plain PyTorch) works.")
        ERROR.__cause__ = error
        return
    if not torch._C._dispatch_has_kernel_for_dispatch_key("idd_ops::class_sums", "Autograd"):
        # built before the ops' autograd moved into the library (csrc/autograd/): it loads, but
        # every gradient through its ops would be dropped with a warning
        ERROR = ImportError(f"the compiled library of idd_ops in {HERE} is older than this package's Python code (it "
                            f"has no autograd kernels): {_rebuild()}. Without it only idd_ops.reference "
                            "(plain PyTorch) works.")


def require() -> None:
    """Raise the load error, for modules that register or call the compiled ops."""
    if ERROR is not None:
        raise ImportError(str(ERROR)) from ERROR.__cause__
