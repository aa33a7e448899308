"""Compile-only check of every CUDA source with the flags of the real build, for machines
with nvcc but no GPU (and a CPU build of torch).

The flags are not restated here: `setup.py build_ext` runs with FORCE_CUDA=1 in a child
process whose torch.utils.cpp_extension hands its ninja step to a stub, so the flags that
BuildExtension would give nvcc (C++ standard, arch list, defines, setup.py's own) are
captured exactly. Sources compile in parallel; a source whose text, headers and flags hash to
a result already checked is skipped (cache outside the tree, IDD_OPS_NVCC_CACHE).

    python tools/nvcc_check.py            # every csrc/cuda/*.cu, archs 8.0 and 9.0
    python tools/nvcc_check.py --unity    # what the test suite runs: about 5x less CPU time

Each source alone costs about 50 s of CPU, most of it in torch's headers, which nvcc parses four
times (its front end, the device compiler for each arch, the host compiler). --unity compiles
every source in one unit that includes them all, so the headers are parsed once: 2.5 min of
CPU for the 13 sources of 6d939a4 (14 now) against about 13 one by one, which matters on CI's 2 cores. Where the
unit fails, each source is compiled alone, which decides and names the file (a name two files
both define fails the unit only). A file that uses a header only an earlier file includes
passes the unit; the real build and the emulator build (tests/cuda_emu) compile each file alone.
"""
import argparse
import concurrent.futures
import glob
import hashlib
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# What a .cu file may include: the shared headers, the composite ops' (a CUDA op falls back to
# its composite) and the CUDA ones (CPU-only headers do not invalidate the cache).
HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "common", "*.h")) + glob.glob(os.path.join(ROOT, "csrc", "composite", "*.h"))
                 + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))
# One arch people train on that predates Hopper, and Hopper itself.
DEFAULT_ARCHS = "8.0;9.0"
CACHE = os.environ.get("IDD_OPS_NVCC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "idd_ops", "nvcc-check"))

_CAPTURE = r"""
import json, os, runpy, sys, tempfile
import torch.utils.cpp_extension as ce

def capture(**kw):
    print("IDD_NVCC_FLAGS " + json.dumps([kw["cuda_cflags"], kw["cuda_post_cflags"]]), flush=True)
    raise SystemExit(0)

if not hasattr(ce, "_write_ninja_file_and_compile_objects"):
    raise SystemExit("torch.utils.cpp_extension has no _write_ninja_file_and_compile_objects: update tools/nvcc_check.py")
ce._write_ninja_file_and_compile_objects = capture
# Compile only: torch refuses an nvcc whose CUDA major differs from its own build's (e.g. torch
# 2.4+cu121 beside nvcc 13), which matters for linking and running, not for whether the sources
# compile against this torch's headers.
ce._check_cuda_version = lambda *args, **kwargs: None
ce.CUDA_HOME = os.environ["CUDA_HOME"]  # a CPU build of torch never looks for a toolkit
tmp = tempfile.mkdtemp()
sys.argv = ["setup.py", "-q", "build_ext", "--build-temp", tmp, "--build-lib", tmp]
runpy.run_path("setup.py", run_name="__main__")
"""


def find_nvcc():
    home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return nvcc if nvcc and os.path.exists(nvcc) else None


def cuda_home(nvcc):
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else "/usr/local/cuda"


def build_flags(nvcc, archs=DEFAULT_ARCHS):
    """(cflags, post_cflags): the nvcc arguments before and after `-c src -o obj` in the build."""
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=archs, CUDA_HOME=cuda_home(nvcc))
    env.pop("FORCE_ONLY_CPU", None)
    proc = subprocess.run([sys.executable, "-c", _CAPTURE], cwd=ROOT, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("IDD_NVCC_FLAGS "):
            pre, post = json.loads(line.split(" ", 1)[1])
            # The ninja file holds shell-quoted words.
            pre = [w for w in shlex.split(" ".join(pre)) if w != "-c"]  # placed before the source below
            return pre, shlex.split(" ".join(post))
    raise RuntimeError(f"could not capture the build's nvcc flags:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def shim_dir():
    """The CPU torch wheel lacks one generated CUDA header; a one-line stand-in provides it."""
    d = os.path.join(tempfile.gettempdir(), "idd_ops_nvcc_shim")
    path = os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return d


def cache_key(sources, command, versions):
    h = hashlib.sha256()
    for path in list(sources) + HEADERS:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    h.update("\0".join(command).encode() + versions.encode())
    return h.hexdigest()


def compile_unit(nvcc, sources, pre, post, versions):
    """(ok, message, cached) for one translation unit: one source, or several included into one."""
    with tempfile.TemporaryDirectory() as tmp:
        unit = sources[0]
        if len(sources) > 1:
            unit = os.path.join(tmp, "unity.cu")
            with open(unit, "w") as f:
                f.writelines(f'#include "{source}"\n' for source in sources)
        command = [nvcc] + pre + [f"-I{shim_dir()}", "-c", unit, "-o", os.path.join(tmp, "out.o")] + post
        key = cache_key(sources, [nvcc] + pre + post, versions)
        marker = os.path.join(CACHE, key)
        if os.path.exists(marker):
            return True, "cached", True
        proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return False, proc.stderr[-6000:] + "\ncommand: " + " ".join(shlex.quote(c) for c in command), False
    os.makedirs(CACHE, exist_ok=True)
    open(marker, "w").close()
    return True, "compiled", False


def check_all(sources=SOURCES, archs=DEFAULT_ARCHS, jobs=None, unity=False):
    """{source: (ok, message, cached)} for every source, compiled in parallel; unity=True first
    tries all of them as one unit, and compiles them one by one only if that fails."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    pre, post = build_flags(nvcc, archs)
    versions = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    versions += "torch " + importlib.metadata.version("torch")  # its headers, upgraded in place, change the result
    if unity and len(sources) > 1:
        ok, _, cached = compile_unit(nvcc, list(sources), pre, post, versions)
        if ok:
            return {s: (True, "cached" if cached else "compiled in one unit", cached) for s in sources}
    jobs = jobs or max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {s: pool.submit(compile_unit, nvcc, [s], pre, post, versions) for s in sources}
        return {s: f.result() for s, f in futures.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help=f"TORCH_CUDA_ARCH_LIST to compile for ({DEFAULT_ARCHS})")
    parser.add_argument("--print-flags", action="store_true", help="print the captured nvcc flags and stop")
    parser.add_argument("--unity", action="store_true", help="all sources as one unit first (one by one if it fails)")
    args = parser.parse_args()
    if args.print_flags:
        pre, post = build_flags(find_nvcc(), args.archs)
        print(" ".join(pre + ["-c", "SRC", "-o", "OBJ"] + post))
        return 0
    failed = 0
    for source, (ok, message, _) in check_all(archs=args.archs, unity=args.unity).items():
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.relpath(source, ROOT)} ({message if ok else 'see below'})")
        if not ok:
            failed += 1
            print(message)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
