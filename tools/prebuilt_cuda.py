"""The CUDA extension built on this machine for a GPU machine, so that the GPU's minutes go to tests.

A session's GPU time is 15 minutes, machine starts included, and compiling the extension there
took 48 s of a call of tools/gpu_check.sh on 2026-11-26 (14 CUDA sources since; the stage allows
100 s). The build needs nvcc and the GPU machine's torch,
not its GPU: both are here (torch from PyPI is the same CUDA build the GPU image carries).

  python tools/prebuilt_cuda.py build [--torch 2.11.0] [--python python3.12] [--archs 9.0]
      here: a venv with that torch (tools/torch_version_check.sh, BUILD_ONLY=1), the working tree
      built in a copy with FORCE_CUDA=1, the library and its stamp written to .prebuilt-cuda/
      (git ignores it; give the device tool carry=[".prebuilt-cuda"] to send it along)
  python tools/prebuilt_cuda.py use [--check [--sources-only]]
      there (gpu_check.sh's build stage): copies the library into idd_ops/ when its stamp names
      these sources and the running torch; exit status 3 (nothing changed) otherwise, and the
      stage builds as before. --check says which, and changes nothing; --sources-only leaves
      torch out (gpu_check.sh --dry-run here, where torch is another)
  python tools/prebuilt_cuda.py fingerprint
      the build inputs' hash: every file under csrc/, and setup.py
  python tools/prebuilt_cuda.py built [--record]
      whether idd_ops/ holds a library with CUDA kernels built (or installed) from these sources,
      as tools/cuda_library.sh records (build/cuda-library.fingerprint): on a warm GPU machine the
      library of the call before stays, and a rerun after a fix here must not test it

The stamp (stamp.json) holds the fingerprint, torch's version and git revision, the CUDA archs
and the Python that built it. The library uses the stable ABI (one file for every CPython >= 3.10,
setup.py), so the Python here need not be the GPU machine's; 3.12 is, and is the default where found.
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ".prebuilt-cuda"
NO_MATCH = 3  # use's exit status when the prebuilt library does not fit
BUILT_FROM = "build/cuda-library.fingerprint"  # the sources of the library in idd_ops/, where recorded


def fingerprint(root=ROOT):
    """sha256 over the relative path and bytes of every build input, in sorted order: every file
    under csrc/ (sources, headers and the .inc files the CPU kernels include) and setup.py."""
    root = Path(root)
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files + [root / "setup.py"]:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def library_name(folder):
    names = sorted(p.name for p in Path(folder).glob("_C*.so"))
    return names[0] if names else None


def torch_identity(python=None):
    """torch's version and the git revision it was built from, as the given interpreter sees them;
    in this process also the visible GPU's compute capability ("9.0"; None without a GPU)."""
    code = "import torch; print(torch.__version__); print(torch.version.git_version)"
    if python is None:
        import torch
        gpu = "%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        return {"torch": torch.__version__, "torch_git": torch.version.git_version, "gpu_arch": gpu}
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"torch": out[0], "torch_git": out[1]}


def mismatch(root=ROOT, identity=None, sources_only=False):
    """Why the prebuilt library in root/.prebuilt-cuda cannot be used there (None: it can).
    sources_only: leave torch out (a machine without the GPU machine's torch, e.g. a dry run here)."""
    folder = Path(root) / FOLDER
    try:
        stamp = json.loads((folder / "stamp.json").read_text())
    except (OSError, ValueError):
        return f"no prebuilt library ({folder}/stamp.json missing or unreadable)"
    if not (folder / stamp.get("library", "")).is_file():
        return f"the stamp names {stamp.get('library')!r}, which {folder} does not hold"
    if stamp.get("fingerprint") != fingerprint(root):
        return (f"built from other sources (revision {stamp.get('revision', '?')}): csrc/ or setup.py "
                "changed since; rerun `python tools/prebuilt_cuda.py build`")
    if sources_only:
        return None
    identity = identity or torch_identity()
    for key in ("torch", "torch_git"):
        if stamp.get(key) != identity[key]:
            return f"built against torch {stamp.get(key)} ({key}), this interpreter has {identity[key]}"
    archs = re.split(r"[;\s]+", stamp.get("archs", "").replace("+PTX", "").strip())
    if identity.get("gpu_arch") and identity["gpu_arch"] not in archs:
        return f"built for compute capability {stamp.get('archs')}, this GPU has {identity['gpu_arch']}"
    return None


def use(root=ROOT, check=False, identity=None, sources_only=False):
    reason = mismatch(root, identity, sources_only)
    if reason:
        print(f"prebuilt CUDA library not used: {reason}")
        return NO_MATCH
    folder = Path(root) / FOLDER
    stamp = json.loads((folder / "stamp.json").read_text())
    if check:
        what = "these sources" if sources_only else "these sources and this torch"
        print(f"prebuilt CUDA library fits {what}: {stamp['library']} of revision {stamp['revision']}, torch "
              f"{stamp['torch']}, archs {stamp['archs']}")
        return 0
    for old in (Path(root) / "idd_ops").glob("_C*.so"):  # one library: the loader takes the first it finds
        old.unlink()
    shutil.copy2(folder / stamp["library"], Path(root) / "idd_ops" / stamp["library"])
    print(f"prebuilt CUDA library installed: {stamp['library']} of revision {stamp['revision']} (built "
          f"{stamp['built']}), torch {stamp['torch']}, archs {stamp['archs']}")
    return 0


def cuda_loaded(root=ROOT):
    """Whether idd_ops in `root` loads with CUDA kernels and sees a GPU (in a child process: this
    tool itself imports no torch but to compare versions)."""
    code = "import sys, idd_ops; sys.exit(0 if idd_ops.cuda_available() else 1)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True).returncode == 0


def built(root=ROOT, record=False, loaded=cuda_loaded):
    """0 when idd_ops/ holds a library that loads with CUDA kernels (loaded(root)) and was made from
    these sources, as recorded; else 1, saying why. record: write these sources as its own first
    (after a build or install that ran a kernel)."""
    path, sources = Path(root) / BUILT_FROM, fingerprint(root)
    if record:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sources + "\n")
    elif not loaded(root):
        print("the library in idd_ops/ has no CUDA kernels here (none built, built without them, or no GPU)")
        return 1
    try:
        recorded = path.read_text().strip()
    except OSError:
        recorded = None
    if recorded == sources:
        return 0
    print("the library in idd_ops/ was built from other sources than these" if recorded else
          f"no record of the sources of the library in idd_ops/ ({path})")
    return 1


def revision(root=ROOT):
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" with uncommitted changes" if git("status", "--porcelain", "--", "csrc", "setup.py") else "")


def default_python():
    """A Python 3.12 that runs (the GPU image's; a pyenv shim may name one that does not), else this one."""
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    candidates = [shutil.which("python3.12"), *map(str, pyenv)]
    for python in filter(None, candidates):
        if subprocess.run([python, "-V"], capture_output=True).returncode == 0:
            return python
    return sys.executable


def cudart_folder():
    """The folder of nvcc's toolkit that holds libcudart.so, or None.

    torch takes CUDA_HOME from `which nvcc` when it is not set: where nvcc is a wrapper script
    (/usr/local/bin/nvcc here), that gives /usr/local, and the link's -lcudart fails. Compiling
    works either way (nvcc knows its own headers), so only the linker is pointed at the library."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and str(Path(nvcc).resolve().parents[1])]
    for home in filter(None, homes):
        for lib in ("lib64", "lib"):
            if (Path(home) / lib / "libcudart.so").exists():
                return str(Path(home) / lib)
    return None


def build(torch_version, python, archs, work=None, root=ROOT):
    if work is None:  # torch_version_check.sh's own default, so its venv serves both
        pyver = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, check=True).stdout.strip()
        work = f"/tmp/idd-torch-{torch_version}-py{pyver}"
    work = Path(work)
    env = dict(os.environ, BUILD_ONLY="1", FORCE_ONLY_CPU="0", FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=archs,
               WORK=str(work))
    cudart = cudart_folder()
    if cudart:
        env["LIBRARY_PATH"] = os.pathsep.join(filter(None, [cudart, os.environ.get("LIBRARY_PATH")]))
    subprocess.run(["bash", str(root / "tools" / "torch_version_check.sh"), torch_version, python], env=env,
                   check=True)
    src = work / "src"
    name = library_name(src / "idd_ops")
    if name is None:
        raise SystemExit(f"the build left no library in {src}/idd_ops")
    folder = root / FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    shutil.copy2(src / "idd_ops" / name, folder / name)
    venv_python = str(work / "venv" / "bin" / "python")
    stamp = {"library": name, "fingerprint": fingerprint(src), "revision": revision(root), "archs": archs,
             "python": subprocess.run([venv_python, "-V"], capture_output=True, text=True).stdout.strip(),
             "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             **torch_identity(venv_python)}
    if stamp["fingerprint"] != fingerprint(root):
        print("warning: csrc/ or setup.py changed during the build; the stamp names the sources built")
    (folder / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    size = (folder / name).stat().st_size / 2**20
    print(f"{folder / name}: {size:.1f} MiB, revision {stamp['revision']}, torch {stamp['torch']}, archs {archs}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build here, for the GPU machine")
    b.add_argument("--torch", default="2.11.0", help="the GPU machine's torch (default: %(default)s)")
    b.add_argument("--python", default=None, help="the venv's interpreter (default: python3.12 where found)")
    b.add_argument("--archs", default="9.0", help="TORCH_CUDA_ARCH_LIST (default: %(default)s, the H100/H200)")
    b.add_argument("--work", default=None,
                   help="venv and build folder (default: torch_version_check.sh's, /tmp/idd-torch-<torch>-py<X.Y>)")
    u = sub.add_parser("use", help="on the GPU machine: install the prebuilt library if it fits")
    u.add_argument("--check", action="store_true", help="only say whether it fits")
    u.add_argument("--sources-only", action="store_true", help="compare the sources, not torch (a dry run here)")
    sub.add_parser("fingerprint", help="print the build inputs' hash")
    r = sub.add_parser("built", help="whether idd_ops/ holds a CUDA library built from these sources")
    r.add_argument("--record", action="store_true", help="record that it was (after a build)")
    args = parser.parse_args(argv)
    if args.command == "build":
        return build(args.torch, args.python or default_python(), args.archs, args.work)
    if args.command == "use":
        return use(check=args.check, sources_only=args.sources_only)
    if args.command == "built":
        return built(record=args.record)
    print(fingerprint())
    return 0


if __name__ == "__main__":
    sys.exit(main())
