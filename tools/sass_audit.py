"""What the CUDA kernels' machine code says, read without a GPU: registers, stack frame and spills
per kernel, and the accesses nvcc split into narrower ones. The CPU emulator runs the kernels as
written (tests/cuda_emu), so it cannot see either: on 2026-12-01 the sm_90 code stored the
class-sum backward's 16-byte vectors as four 4-byte stores (32-bit index variant only), and the
class-sum pass waited for each step's loads before issuing the next step's.

    python tools/sass_audit.py                         # every csrc/cuda/*.cu, compiled here for sm_90
    python tools/sass_audit.py csrc/cuda/class_sums_cuda.cu --match sums_private
    python tools/sass_audit.py .prebuilt-cuda/_C.abi3.so --loads sums_private_kernelIfLi4E

--loads NAME prints the order of one kernel's global/shared accesses, barriers and branches
(`(back)` marks a loop's branch back), which shows how many loads a loop issues before it waits.
Needs nvcc for sources and a cuobjdump: $CUOBJDUMP, the CUDA toolkit's, or the copy in Triton's
wheel (pip install triton; the GPU image's torch brings it). Exit status 1 where a kernel spills
registers to local memory. A stack frame without spills is reported, not failed: sinf/cosf keep
one for the argument reduction of huge angles, a path the position maps never take.
"""
import argparse
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvcc_check  # noqa: E402

ROOT = nvcc_check.ROOT
MEMORY_OPS = ("LDG", "STG", "LDS", "STS", "ATOMS", "ATOMG", "RED", "SHFL", "BAR", "BRA", "EXIT", "VOTE", "LDL", "STL")
WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # bytes by suffix; none: 4


def find_cuobjdump():
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    nvcc = nvcc_check.find_nvcc()
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump"))
    for path in candidates:
        if path and os.path.exists(path):
            return path
    raise SystemExit("no cuobjdump: set CUOBJDUMP, or pip install triton (its wheel carries one)")


@functools.lru_cache(maxsize=None)
def sm90_command():
    """(nvcc, flags before the source, flags after): the real build's flags (nvcc_check, one
    capture of setup.py for every source), for sm_90 machine code only."""
    nvcc = nvcc_check.find_nvcc()
    if nvcc is None:
        raise SystemExit("no nvcc: set CUDA_HOME or put nvcc on PATH")
    pre, post = nvcc_check.build_flags(nvcc, "9.0")
    return nvcc, pre + [f"-I{nvcc_check.shim_dir()}", "-cubin", "-arch=sm_90"], \
        [w for w in post if not w.startswith("-gencode")]


def compile_cubin(source, out):
    nvcc, pre, post = sm90_command()
    proc = subprocess.run([nvcc] + pre + [source, "-o", out] + post, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{source} did not compile:\n{proc.stderr[-4000:]}")


def demangle(names):
    proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else list(names)


def resources(cuobjdump, binary):
    """{mangled kernel: (registers, stack bytes, local bytes)}."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", binary], capture_output=True, text=True).stdout
    found = re.findall(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return {name: (int(reg), int(stack), int(local)) for name, reg, stack, local in found}


def sass(cuobjdump, binary):
    """{mangled kernel: [(offset, instruction)]}."""
    text = subprocess.run([cuobjdump, "-sass", binary], capture_output=True, text=True).stdout
    kernels = {}
    for part in re.split(r"\n\s+Function : ", text)[1:]:
        name, body = part.split("\n", 1)
        kernels[name.strip()] = [(int(m.group(1), 16), m.group(2).strip())
                                 for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
    return kernels


def opcode(instruction):
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def split_accesses(instructions):
    """Narrow global loads or stores that fill one aligned 16-byte window from one base register
    ({0, 4, 8, 12} for 4-byte accesses): a vector access nvcc split."""
    groups = {}
    for _, ins in instructions:
        op = opcode(ins)
        kind = op.split(".")[0]
        if kind not in ("LDG", "STG"):
            continue
        width = next((WIDTH[s] for s in op.split(".")[2:] if s in WIDTH), 4)
        if width == 16:
            continue
        m = re.search(r"\[(R\d+)(?:\.64)?([+-]0x[0-9a-f]+)?\]", ins)
        if m:
            groups.setdefault((kind, width, m.group(1)), set()).add(int(m.group(2) or "0", 16))
    found = []
    for (kind, width, reg), offsets in groups.items():
        for start in {o - o % 16 for o in offsets}:
            if all(start + i in offsets for i in range(0, 16, width)):
                found.append(f"{kind} {16 // width} x {width} bytes at {reg}+{start:#x}")
    return sorted(found)


def access_order(instructions):
    """One line: the kernel's memory operations, barriers and branches in program order."""
    words = []
    for offset, ins in instructions:
        op = opcode(ins)
        kind = op.split(".")[0]
        if kind not in MEMORY_OPS:
            continue
        word = kind + ("." + op.split(".")[-1] if kind in ("LDG", "STG") and op.count(".") > 1 else "")
        target = re.search(r"BRA\s+(?:`\(\.L_\w+\)|0x([0-9a-f]+))", ins)
        if kind == "BRA" and target and target.group(1) and int(target.group(1), 16) < offset:
            word += "(back)"
        words.append(f"{offset:04x}:{word}")
    return " ".join(words)


def audit(binary, match, cuobjdump):
    usage, code = resources(cuobjdump, binary), sass(cuobjdump, binary)
    names = sorted(n for n in code if re.search(match, n))
    spilled = 0
    for name, readable in zip(names, demangle(names)):
        reg, stack, local = usage.get(name, (0, 0, 0))
        split = split_accesses(code[name])
        stack_ops = sum(1 for _, ins in code[name] if opcode(ins).split(".")[0] in ("LDL", "STL"))
        spilled += bool(local)
        notes = [f"{reg} registers"] + ([f"spills: {local} B of local memory"] if local else []) + \
                ([f"stack frame {stack} B, {stack_ops} LDL/STL"] if stack else []) + \
                ([f"split: {'; '.join(split)}"] if split else [])
        print(f"{readable[:150]}\n    {', '.join(notes)}")
    return spilled


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="CUDA sources, cubins or built libraries (default: every csrc/cuda/*.cu)")
    parser.add_argument("--match", default=".", help="regular expression on the mangled kernel names")
    parser.add_argument("--loads", metavar="NAME", help="print the access order of the kernels whose mangled name matches")
    args = parser.parse_args()
    cuobjdump = find_cuobjdump()
    spilled = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.inputs or nvcc_check.SOURCES:
            binary = path
            if path.endswith(".cu"):
                binary = os.path.join(tmp, os.path.basename(path) + ".cubin")
                compile_cubin(path, binary)
            print(f"== {os.path.relpath(path, ROOT)}")
            if args.loads:
                code = sass(cuobjdump, binary)
                names = [n for n in code if re.search(args.loads, n)]
                for name, readable in zip(names, demangle(names)):
                    print(f"{readable[:150]}\n{access_order(code[name])}")
                continue
            spilled += audit(binary, args.match, cuobjdump)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
