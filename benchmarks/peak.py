"""Peak extra CPU memory of one benchmark call, measured in a fresh process.

In a long-lived process, memory freed by an earlier call is reused and hides a later call's
allocations, so each measurement starts its own interpreter:
    python -m benchmarks.peak "<case name>" {fused,reference,compiled} {forward,forward+backward}
prints the bytes by which the peak resident set grew while the call ran. "compiled" is
measured on its second call (the first compiles); the others on their first.
"""
import subprocess
import sys

from . import common


def measure(case_name, impl, backward):
    mode = "forward+backward" if backward else "forward"
    out = subprocess.run([sys.executable, "-m", "benchmarks.peak", case_name, impl, mode],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure_shape(shape, impl):
    """Peak memory of one IDD-loss forward+backward at an explicit SHAPES-style tuple."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.peak", "--idd-shape", ",".join(map(str, shape)), impl],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    from . import cases

    if sys.argv[1] == "--idd-shape":
        common.SHAPES["custom"] = tuple(int(v) for v in sys.argv[2].split(","))
        sys.argv[1:] = ["idd_loss custom", sys.argv[3], "forward+backward"]
    case_name, impl, mode = sys.argv[1:4]
    fn = cases.make(case_name).build(impl, mode == "forward+backward")
    if impl == "compiled":
        fn()
    print(common.peak_memory_bytes(fn))


if __name__ == "__main__":
    main()
