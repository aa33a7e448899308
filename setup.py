"""Build idd_ops: the C++ extension always, the CUDA kernels when a CUDA toolchain is present.

Torch must already be installed; install with `pip install --no-build-isolation .` so that
pip does not fetch a second (multi-GB) torch into an isolated build environment.
  FORCE_CUDA=1      build the CUDA kernels even where torch/CUDA detection says no
  FORCE_ONLY_CPU=1  never build them
  IDD_OPS_PORTABLE=1  compile the CPU kernels for baseline x86-64 (SSE2) even where the
                      building machine has AVX2/FMA (use it when building for other machines)
"""
import glob
import os
import platform

from setuptools import find_packages, setup

TORCH_MISSING = """
idd_ops: torch cannot be imported here, so the extension cannot be built.

idd_ops compiles against the torch that is already installed in your environment. If torch is
installed and you ran `pip install .`, pip built in an isolated environment, which has no torch
on purpose (it would otherwise download a second, multi-GB torch): add --no-build-isolation.
Otherwise install torch first. The commands:

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # CPU build
    pip install torch==2.13.0                        # CUDA build (the default on PyPI, several GB)
    pip install --no-build-isolation .               # then idd_ops (about 9 min on 2 busy CPU cores)

(Any torch >= 2.4 works; the import error was: {error})
"""
try:
    import torch
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


def host_simd_flags():
    """AVX2 + FMA when the building x86-64 machine has them: a source build runs where it is
    built, and the exp-bound kernels (pixel KD, CWD) run about twice as fast with 8-wide vectors."""
    if os.environ.get("IDD_OPS_PORTABLE", "0") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "composite", "*.cpp")))
    # at::parallel_for is an inline template over OpenMP: without -fopenmp in this
    # extension's own flags it compiles to a serial loop.
    # -fno-trapping-math: lets the compiler if-convert the branch-free exp's clamps and
    # vectorise its loops (no result changes; FP exception flags are never read).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"] + host_simd_flags()
    link = ["-fopenmp"]
    print(f"idd_ops: C++ flags {' '.join(cxx)}")
    if want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        print(f"idd_ops: building CPU and CUDA kernels ({len(sources)} sources)")
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        return CUDAExtension("idd_ops._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=link)
    print(f"idd_ops: building CPU kernels only ({len(sources)} sources)")
    return CppExtension("idd_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


class BuildWithNotice(BuildExtension.with_options(use_ninja=True)):
    """Says up front what is compiled and how long it takes: pip shows nothing for minutes
    otherwise (`pip install -v` shows ninja's [i/n] steps as they finish)."""

    def run(self):
        print("idd_ops: compiling the C++ kernels: about 9 minutes on 2 CPU cores shared with other builds "
              "(4 minutes of CPU time, so less on idle cores; more with the CUDA kernels)", flush=True)
        super().run()


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
    classifiers=["Programming Language :: Python :: 3",
                 "Programming Language :: C++", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "numpy"], "bench": ["pytest-benchmark", "numpy"], "demo": ["matplotlib"]},
    entry_points={"console_scripts": ["idd-distill=idd_ops.demo.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithNotice},
    zip_safe=False,
)
