"""Build idd_ops: the C++ extension always, the CUDA kernels when a CUDA toolchain is present.

Torch must already be installed; install with `pip install --no-build-isolation .` so that
pip does not fetch a second (multi-GB) torch into an isolated build environment.
  FORCE_CUDA=1      build the CUDA kernels even where torch/CUDA detection says no
  FORCE_ONLY_CPU=1  never build them
  TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA kernels; unset and no GPU visible:
                        DEFAULT_CUDA_ARCHS (those the installed nvcc can build)
  IDD_OPS_DEBUG_INFO=1  keep the -g of Python's compiler flags (left out by default)
The CPU code is portable: built for baseline x86-64, with the vector-width-bound loops also
compiled for AVX2 + FMA and for AVX-512 and chosen at load time (csrc/cpu/dispatch.h); no -march/-m flags.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

TORCH_MISSING = """
idd_ops: torch cannot be imported here, so the extension cannot be built.

idd_ops compiles against the torch that is already installed in your environment. If torch is
installed and you ran `pip install .` (or `python -m build`), the build ran in an isolated
environment, which has no torch on purpose (it would otherwise download a second, multi-GB
torch): add --no-build-isolation (`python -m build --no-isolation`). Otherwise install torch
first. The commands:

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # CPU build
    pip install torch==2.13.0                        # CUDA build (the default on PyPI, several GB)
    pip install --no-build-isolation .               # then idd_ops (1.5 min on 2 idle CPU cores)

(Any torch >= 2.4 works; the import error was: {error})
"""
try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:
    raise SystemExit(TORCH_MISSING.format(error=e)) from None

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    if os.environ.get("FORCE_ONLY_CPU", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


# GPUs people train on: Volta, Turing, Ampere (A100, RTX 30), Ada (RTX 40, L40), Hopper, plus
# PTX of the newest so later GPUs JIT-compile it. Used when TORCH_CUDA_ARCH_LIST is unset and no
# GPU is visible (torch would otherwise target the visible GPUs, and fails with none).
DEFAULT_CUDA_ARCHS = ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]

# One wheel for every CPython from this version on (the stable ABI): the extension uses only
# PyModule_Create from Python's C API, the rest goes through torch's dispatcher. Torch >= 2.6
# knows the flag (it defines Py_LIMITED_API and skips libtorch_python); older ones build a
# wheel per Python version.
LIMITED_API_CPYTHON = getattr(cpp_extension, "min_supported_cpython", None)


def nvcc_archs():
    """Compute capabilities ("7.5", ...) the installed nvcc can build, or None if it cannot say."""
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {f"{int(m) // 10}.{int(m) % 10}" for m in re.findall(r"compute_(\d+)", out)}


def set_cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print(f"idd_ops: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (from the environment)")
        return
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        print("idd_ops: TORCH_CUDA_ARCH_LIST unset: building for the visible GPUs")
        return
    known = nvcc_archs()
    archs = [a for a in DEFAULT_CUDA_ARCHS if known is None or a in known]
    archs[-1] += "+PTX"
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    print(f"idd_ops: no GPU visible, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (default)")


def torch_libstdcxx():
    """The shared libstdc++ that torch runs with, as a link argument ([] where none is found).

    A toolchain without a shared libstdc++ of its own (seen on a CUDA image whose g++ links it
    statically) gives the extension a private copy beside torch's, whose locale facets do not
    match the process's: formatting a number into an error message then crashes. Linking the
    library already loaded here makes the extension share torch's; elsewhere it is the one the
    compiler would pick anyway."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(paths)[:1]


def extension():
    # csrc/unit_<group>.cpp includes every file of csrc/<group>/ (cpu, composite, autograd): one
    # translation unit a group, so that torch's headers are read once for it, not once a file
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "kernels", "*.cpp")))
    # at::parallel_for is an inline template over OpenMP: without -fopenmp in this
    # extension's own flags it compiles to a serial loop.
    # -fno-trapping-math: lets the compiler if-convert the branch-free exp's clamps and
    # vectorise its loops (no result changes; FP exception flags are never read).
    # -ffp-contract=off: no fused multiply-adds the source does not write, so the baseline
    # code rounds alike on every CPU and compiler; only the AVX2 and AVX-512 kernel variants fuse them
    # (csrc/cpu/kernels/per_capability.h).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
    link = ["-fopenmp"] + torch_libstdcxx()
    limited = {"py_limited_api": True} if LIMITED_API_CPYTHON else {}
    print(f"idd_ops: C++ flags {' '.join(cxx)}; CPU kernels dispatched at load time (baseline, AVX2+FMA, AVX-512)")
    if want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        print(f"idd_ops: building CPU and CUDA kernels ({len(sources)} sources)")
        set_cuda_arch_list()
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        return CUDAExtension("idd_ops._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=link, **limited)
    print(f"idd_ops: building CPU kernels only ({len(sources)} sources)")
    return CppExtension("idd_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, **limited)


def limited_api_tag():
    """bdist_wheel's tag for the stable ABI: torch's minimum CPython, "0x030A0000" -> "cp310"."""
    return f"cp3{int(LIMITED_API_CPYTHON[4:6], 16)}" if LIMITED_API_CPYTHON else None


class BuildWithNotice(BuildExtension.with_options(use_ninja=True)):
    """Says up front what is compiled and how long it takes: pip shows nothing for minutes
    otherwise (`pip install -v` shows ninja's [i/n] steps as they finish)."""

    def run(self):
        compiler = os.environ.get("CXX", "c++")  # what torch's build uses on Linux and macOS
        if os.name == "posix" and shutil.which(compiler.split()[0]) is None:
            raise SystemExit(f"idd_ops: no C++ compiler found ({compiler!r} is not on PATH; set CXX to use another). "
                             "Install one with OpenMP, e.g. g++ (Debian/Ubuntu: apt-get install g++; Fedora: dnf "
                             "install gcc-c++), then run the install again.")
        print("idd_ops: compiling the C++ kernels: about 1.5 minutes on 2 idle CPU cores, several times that when "
              "other builds share them; more with the CUDA kernels", flush=True)
        super().run()

    def build_extensions(self):
        # Python's own CFLAGS carry -g, which doubles the compile time of a file that includes
        # torch's headers (e.g. 40 s -> 20 s) for debug information that torch's own release
        # builds do not ship either. IDD_OPS_DEBUG_INFO=1 keeps it.
        command = getattr(self.compiler, "compiler_so", None)  # Unix compilers; MSVC has none
        if command and os.environ.get("IDD_OPS_DEBUG_INFO", "0") != "1":
            self.compiler.set_executable("compiler_so", [f for f in command if f != "-g"])
        super().build_extensions()


setup(
    name="idd_ops",
    version="0.1.0",
    description="Fused C++/CUDA kernels for inter-class distance distillation in semantic segmentation",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["idd_ops", "idd_ops.*"]),
    package_data={"idd_ops": ["py.typed"]},  # the public API carries type hints (PEP 561)
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    # the licence is named by `license` alone: setuptools deprecates License classifiers beside it
    classifiers=["Development Status :: 3 - Alpha", "Programming Language :: Python :: 3",
                 "Programming Language :: C++", "Operating System :: POSIX :: Linux",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "numpy"], "bench": ["pytest-benchmark", "numpy"], "demo": ["matplotlib"]},
    entry_points={"console_scripts": ["idd-distill=idd_ops.demo.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithNotice},
    options={"bdist_wheel": {"py_limited_api": limited_api_tag()}} if LIMITED_API_CPYTHON else {},
    zip_safe=False,
)
