"""Builds the library's CUDA sources for the CPU emulator (emu.h), as the torch library
`idd_ops_emu`: the same ops and schemas as `idd_ops`, their CUDA kernels registered for CPU
tensors. A test calls torch.ops.idd_ops_emu.<op> on CPU tensors and compares with the CPU op or
the reference; `torch.ops.idd_ops_emu._emu_configure(cuda_next, seed)` selects the kernels behind
IDD_OPS_CUDA_NEXT (every group or none) and the seed of the emulator's block and thread orders,
`_emu_next_groups(spec)` some of the groups, by csrc/common/next_groups.h's parser (its result,
one bit a group, returned);
`_emu_launch_log()` gives the launches since its last call as (blocks, threads per block, dynamic
shared bytes) triples, flattened, so a test can check which plan a host function chose.

The sources are rewritten textually on the way (translate): kernel launches `k<<<cfg>>>(args)`
become emulator calls, `__shared__` arrays become per-block static storage (poisoned at each
block's start), device asserts raise, the CUDA registrations go to namespace idd_ops_emu under the
CPU key, cuda_utils.cuh's vector loads and stores check their alignment (a GPU faults on a
misaligned one), and csrc/common/cuda_next.h reads the emulator's setting instead of the
environment.
Everything else compiles as written, with tests/cuda_emu/include shadowing the CUDA headers.
Once loaded, torch's CPU allocator keeps redzones around every new allocation
(redzone_allocator.cpp), which the memory model checks every kernel access against, and fills
fresh storage with 0xFF bytes (NaN, or -1 for integers).

    python -m tests.cuda_emu.build    # translate and build (cached in build/cuda_emu), then load
"""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def source_revision(*paths):
    """What a generated report names as its revision: the checkout's short commit hash, marked
    where `paths` have uncommitted changes; "an unknown revision" outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "an unknown revision"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    return head + (f" with uncommitted changes to {', '.join(paths)}" if dirty else "")
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
# IDD_OPS_EMU_COVERAGE=1: a second build, instrumented for gcov as well (tests/cuda_emu/coverage.py)
COVERAGE = os.environ.get("IDD_OPS_EMU_COVERAGE", "0") == "1"
COVERAGE_BUILD = ROOT / "build" / "cuda_emu-coverage"
# IDD_OPS_EMU_FMA=1: a build whose kernels contract a * b + c into fused multiply-adds, as nvcc
# does by default (--fmad=true) and the CPU build does not (-ffp-contract=off): a test that holds a
# kernel to the CPU op too tightly, or a kernel whose cancellations contraction breaks (x*x - y*y
# below 0 for x == y), fails there as it would on a GPU. GCC contracts other sites than nvcc, so
# it is a probe, not a replica (docs/DEVELOPING.md).
FMA = os.environ.get("IDD_OPS_EMU_FMA", "0") == "1"
FMA_FLAGS = ["-mfma", "-ffp-contract=fast", "-fexpensive-optimizations"] if FMA else []
BUILD = COVERAGE_BUILD if COVERAGE else ROOT / "build" / ("cuda_emu-fma" if FMA else "cuda_emu")

SHARED_ARRAY = re.compile(r"(?P<extern>extern\s+)?__shared__\s+(?P<align>__align__\(\s*\d+\s*\)\s+)?(?P<rest>[^;]*);")
CUDA_NEXT_SHIM = """#pragma once
// Rewritten for the CUDA emulator (tests/cuda_emu/build.py): the IDD_OPS_CUDA_NEXT kernels follow
// the emulator's setting (torch.ops.idd_ops_emu._emu_configure and _emu_next_groups), so one
// process can test several sets.
#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>

#include "next_groups.h"

namespace idd_ops {

inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

inline bool cuda_next_enabled(NextGroup group) { return (::emu::next_groups() & static_cast<uint32_t>(group)) != 0; }

}  // namespace idd_ops
"""


def _matching(text, start, open_ch, close_ch, step=1):
    """Index of the bracket that closes (step 1) or opens (step -1) the one at `start`."""
    depth = 0
    i = start
    while 0 <= i < len(text):
        c = text[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError(f"unbalanced {open_ch}{close_ch} at offset {start}")


def _split_top_level(text, sep=","):
    parts, depth, last = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    parts.append(text[last:])
    return [p.strip() for p in parts]


def _same_lines(original, replacement):
    """`replacement` padded with the line breaks it drops from `original`, so that every later line
    keeps its number in the source (compiler messages and the coverage report use them)."""
    return replacement + "\n" * max(0, original.count("\n") - replacement.count("\n"))


def _shared(match):
    align = match.group("align")
    rest = match.group("rest").strip()
    if match.group("extern"):  # extern __shared__ T name[];  -> the launch's dynamic buffer
        type_, name = re.fullmatch(r"(.+?)\s*\b(\w+)\s*\[\s*\]", rest).groups()
        buffer = f"{type_}* {name} = reinterpret_cast<{type_}*>(::emu::dynamic_shared());"
        return _same_lines(match.group(0), buffer)
    # __shared__ T a[N], b[M];  -> static storage (one block runs at a time), poisoned per block
    type_, first = re.fullmatch(r"(.+?)\s+(\w+\s*\[.*|\w+)", rest, re.S).groups()
    decls = _split_top_level(first)
    names = [re.match(r"\w+", d).group(0) for d in decls]
    prefix = align.replace("__align__", "alignas") if align else ""
    poison = " ".join(f"::emu::poison_shared(&{n}, sizeof({n}));" for n in names)
    return _same_lines(match.group(0), f"{prefix}static {type_} {', '.join(decls)}; {poison}")


def _launches(text, name):
    out, pos = [], 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        # The callee: an identifier, perhaps qualified, perhaps with template arguments.
        i = start - 1
        while text[i].isspace():
            i -= 1
        if text[i] == ">":
            i = _matching(text, i, ">", "<", step=-1) - 1
        while text[i].isalnum() or text[i] in "_:":
            i -= 1
        callee_start = i + 1
        callee = text[callee_start:start].strip()
        end_cfg = text.index(">>>", start)
        cfg = text[start + 3:end_cfg]
        j = end_cfg + 3
        while text[j].isspace():
            j += 1
        assert text[j] == "(", f"{name}: a launch without arguments at offset {j}"
        close = _matching(text, j, "(", ")")
        args = text[j + 1:close]  # unstripped: its line breaks stay where the source has them
        line = text.count("\n", 0, start) + 1
        rest = ", " + args if args.strip() else ""
        call = f'::emu::launch("{name}:{line}", ::emu::config({cfg}), {callee}{rest})'
        out.append(text[pos:callee_start])
        out.append(_same_lines(text[callee_start:close + 1], call))
        pos = close + 1


# The vector accesses of csrc/cuda/cuda_utils.cuh, checked for the alignment a GPU requires.
# Each is seen whole by the memory model (the functions' own accesses are left uninstrumented).
VECTOR_ACCESSES = [
    ("__device__ __forceinline__ Vec<T, N> load_vec(", "return *reinterpret_cast<const Vec<T, N>*>(p);", "false"),
    ("__device__ __forceinline__ void store_vec(", "*reinterpret_cast<Vec<T, N>*>(p) = v;", "true"),
]


def translate_source(text, name):
    """One CUDA source (.cu or .cuh) rewritten for the emulator."""
    if name.endswith("/cuda_utils.cuh"):
        for decl, access, write in VECTOR_ACCESSES:
            for part in (decl, access):
                assert part in text, f"{name}: {part!r} moved; update VECTOR_ACCESSES"
            text = text.replace(decl, decl.replace("__forceinline__", "__forceinline__ EMU_UNCHECKED"))
            text = text.replace(access, "::emu::check_aligned(p, sizeof(Vec<T, N>)); ::emu::vector_access(p, "
                                f"sizeof(Vec<T, N>), {write}, __builtin_return_address(0)); " + access)
    text = SHARED_ARRAY.sub(_shared, text)
    text = _launches(text, name)
    text = text.replace("CUDA_KERNEL_ASSERT(", "EMU_KERNEL_ASSERT(")
    text, n = re.subn(r"TORCH_LIBRARY_IMPL\(\s*idd_ops\s*,\s*CUDA\s*,\s*(\w+)\s*\)", r"EMU_CUDA_IMPL(\1)", text)
    # #line keeps the source's line numbers (the coverage report maps lines back to csrc/cuda)
    return "#include <emu_registry.h>\n#line 1\n" + text if n else text


# Runs the collected EMU_CUDA_IMPL blocks into a library for CPU tensors of namespace `ns`, kept
# alive until `remove` (the dispatcher then restores the kernels they covered).
REGISTER = """
namespace emu {
void install_redzone_allocator();  // redzone_allocator.cpp

void register_blocks(const char* ns, bool remove) {
  static std::vector<std::pair<std::string, std::unique_ptr<torch::Library>>> libraries;
  for (auto it = libraries.begin(); it != libraries.end(); ++it) {
    if (it->first != ns) continue;
    if (remove) libraries.erase(it);
    return;
  }
  if (remove) return;
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, ns, c10::DispatchKey::CPU, __FILE__, __LINE__);
  for (ImplFn fn : impl_blocks()) fn(*lib);
  libraries.emplace_back(ns, std::move(lib));
}
}  // namespace emu
"""


def _schemas():
    """The TORCH_LIBRARY block of csrc/idd_ops.cpp under the name idd_ops_emu, with the
    emulator's settings and probes as more ops (_emu_*)."""
    text = (CSRC / "idd_ops.cpp").read_text()
    start = text.index("TORCH_LIBRARY(idd_ops, m) {")
    end = _matching(text, text.index("{", start), "{", "}")
    body = text[text.index("{", start) + 1:end]
    return (
        "// Generated by tests/cuda_emu/build.py from csrc/idd_ops.cpp.\n"
        "#include <cuda_runtime.h>\n#include <emu_registry.h>\n#include <memory_model.h>\n\n#include <memory>\n\n"
        '#include "common/next_groups.h"\n\n'
        + REGISTER +
        "\nTORCH_LIBRARY(idd_ops_emu, m) {" + body +
        '  m.def("_emu_configure(bool cuda_next, int seed) -> ()", [](bool next, int64_t seed) '
        "{ emu::configure(next, seed); });\n"
        '  m.def("_emu_next_groups(str spec) -> int", [](std::string spec) -> int64_t {\n'
        "    const uint32_t groups = idd_ops::parse_next_groups(spec.c_str());\n"
        "    emu::set_next_groups(groups);\n"
        "    return groups;\n"
        "  });\n"
        '  m.def("_emu_launches() -> int", [] { return emu::launches(); });\n'
        '  m.def("_emu_selftest(str name, Tensor x) -> Tensor");\n'
        '  m.def("_emu_profile() -> str", [] { return emu::profile(); });\n'
        '  m.def("_emu_register() -> ()", [] {\n'
        '    emu::register_blocks("idd_ops_emu", false);\n'
        '    emu::install_redzone_allocator();\n'
        '  });\n'
        '  m.def("_emu_override(bool on) -> ()", [](bool on) { emu::register_blocks("idd_ops", !on); });\n'
        '  m.def("_emu_launch_log() -> int[]", [] { return emu::take_launch_log(); });\n'
        '  m.def("_emu_memory(int mode) -> int", [](int64_t mode) -> int64_t { return emu::memory::set_mode(static_cast<int>(mode)); });\n'
        '  m.def("_emu_traffic() -> str", [] { return emu::memory::take_log(); });\n}\n'
    )


# Host functions the CUDA sources share with the CPU build (the composite IDD tail, ordered
# centroids, SKD's formulations): compiled in as well, their registrations renamed like the CUDA ones.
COMPOSITE_UNITS = ["idd_tail.cpp", "class_centroids_ordered.cpp", "affinity_loss.cpp", "affinity_loss_batched.cpp"]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:  # keep mtimes, so ninja rebuilds what changed
        path.write_text(text)


def translate(out=BUILD / "src"):
    """Writes the emulator's sources under `out`; returns the translation units."""
    for src in (CSRC / "common").glob("*.h"):
        _write(out / "common" / src.name, CUDA_NEXT_SHIM if src.name == "cuda_next.h" else src.read_text())
    units = []
    for src in sorted((CSRC / "cuda").iterdir()):
        text = translate_source(src.read_text(), f"csrc/cuda/{src.name}")
        if src.suffix == ".cu":
            dst = out / "cuda" / (src.stem + ".cpp")
            units.append(dst)
        else:
            dst = out / "cuda" / src.name
        _write(dst, text)
    for header in (CSRC / "composite").glob("*.h"):
        _write(out / "composite" / header.name, header.read_text())
    for name in COMPOSITE_UNITS:
        text = (CSRC / "composite" / name).read_text()
        units.append(out / "composite" / name)
        _write(units[-1], re.sub(r"TORCH_LIBRARY_IMPL\(\s*idd_ops\s*,", "TORCH_LIBRARY_IMPL(idd_ops_emu,", text))
    units.append(out / "redzone_allocator.cpp")  # torch's CPU allocator with redzones (memory_model.h)
    _write(units[-1], (HERE / "redzone_allocator.cpp").read_text())
    units.append(out / "selftest.cpp")  # the emulator's own test kernels (selftest.cu)
    _write(units[-1], translate_source((HERE / "selftest.cu").read_text(), "tests/cuda_emu/selftest.cu"))
    _write(out / "schemas.cpp", _schemas())
    return units + [out / "schemas.cpp"]


# The translated sources compile as a few units that include them: each includes torch's headers,
# which took the compiler about 30 s a file (21 files: 7 min of compiler time, 4 of wall time on 2
# cores). UNITS of them, so that the build still uses the cores. The coverage build keeps one unit
# a file: gcov names its counters after each unit.
UNITS = 2


def grouped(sources, out=BUILD / "src", units=UNITS):
    """Units out/unit_<i>.cpp that #include `sources` (absolute paths: __FILE__ unchanged), split
    into `units` groups of about equal bytes; returns their paths."""
    groups = [[] for _ in range(units)]
    sizes = [0] * units
    for src in sorted(sources, key=lambda p: -p.stat().st_size):
        i = sizes.index(min(sizes))
        groups[i].append(src)
        sizes[i] += src.stat().st_size
    paths = []
    for i, group in enumerate(g for g in groups if g):
        paths.append(out / f"unit_{i}.cpp")
        _write(paths[-1], "// Generated by tests/cuda_emu/build.py: one translation unit for these sources.\n"
               + "".join(f'#include "{src}"\n' for src in sorted(group)))
    return paths


RUNTIME_SOURCES = ["emu.cpp", "memory_model.cpp"]
RUNTIME_HEADERS = ["emu.h", "memory_model.h"]


def build_runtime(out=BUILD / "runtime"):
    """The emulator itself (the fiber scheduler and the memory model), built uninstrumented as a
    shared library the kernels link to; rebuilt when its sources change. Returns its folder."""
    import fcntl
    import torch

    out.mkdir(parents=True, exist_ok=True)
    lib = out / "libidd_ops_emu_runtime.so"
    stamp = out / "sources.sha256"
    # torch's C++ ABI (std::string crosses into the kernels' library); -Bsymbolic binds the
    # runtime's own template instances to itself, never to the instrumented copies in the kernels'
    command = [os.environ.get("CXX", "c++"), "-std=c++20", "-O2", "-fPIC", "-shared", "-Wl,-Bsymbolic",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[str(HERE / n) for n in RUNTIME_SOURCES], "-lpthread"]
    digest = hashlib.sha256(" ".join(command).encode() + b"".join(
        (HERE / n).read_bytes() for n in RUNTIME_SOURCES + RUNTIME_HEADERS)).hexdigest()
    with open(out / "lock", "w") as lock:  # pytest-xdist workers build it once between them
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists() and stamp.exists() and stamp.read_text() == digest:
            return out
        tmp = out / f"lib.{os.getpid()}.so"
        subprocess.run([*command, "-o", str(tmp)], check=True)
        os.replace(tmp, lib)
        stamp.write_text(digest)
    return out


# The kernels are compiled with the thread sanitizer's instrumentation (every load and store calls
# a hook), but without its runtime: memory_model.cpp defines the hooks. Function entry and exit
# hooks are left out (the --param needs GCC 11 or later; the emulator builds with GCC only).
INSTRUMENT = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]
# gcov's counters updated atomically: the sanitizer's instrumentation then hands them to the
# runtime's atomics, which the memory model leaves alone (plain updates would be global writes
# from every block, i.e. races)
COVERAGE_FLAGS = ["--coverage", "-fprofile-update=atomic"] if COVERAGE else []
# -O0 for coverage: at -O1 the compiler folds small branches into selects, which gcov cannot see
OPTIMIZE = "-O0" if COVERAGE else "-O1"

_LOADED = False


def load(verbose=False):
    """Translates, builds (incrementally) and loads the emulated library; returns its ops
    (torch.ops.idd_ops_emu). Needs idd_ops imported first (its CPU ops serve the composite calls)."""
    import torch
    import torch.utils.cpp_extension as ext

    import idd_ops  # noqa: F401  (registers idd_ops::*, which the emulated sources call)

    global _LOADED
    if _LOADED:
        return torch.ops.idd_ops_emu
    units = translate()
    if not COVERAGE:
        units = grouped(units)
    BUILD.mkdir(parents=True, exist_ok=True)
    runtime = build_runtime()
    ext.load(
        name="idd_ops_emu",
        sources=[str(u) for u in units],
        extra_include_paths=[str(HERE / "include"), str(HERE), str(BUILD / "src")],
        extra_cflags=[OPTIMIZE, "-fno-strict-aliasing", *INSTRUMENT, *COVERAGE_FLAGS, *FMA_FLAGS],
        extra_ldflags=[f"-L{runtime}", "-lidd_ops_emu_runtime", f"-Wl,-rpath,{runtime}", *COVERAGE_FLAGS],
        build_directory=str(BUILD),
        is_python_module=False,
        verbose=verbose,
    )
    torch.ops.idd_ops_emu._emu_register()
    _LOADED = True
    return torch.ops.idd_ops_emu


if __name__ == "__main__":
    ops = load(verbose=True)
    print("idd_ops_emu loaded:", ops)
