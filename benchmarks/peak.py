"""Peak extra CPU memory of one benchmark call, measured in a fresh process.

In a long-lived process, memory freed by an earlier call is reused and hides a later call's
allocations, so each measurement starts its own interpreter:
    python -m benchmarks.peak "<case name>" {fused,reference} {forward,forward+backward}
prints the bytes by which the peak resident set grew while the call ran.
"""
import subprocess
import sys

from . import common


def measure(case_name, impl, backward):
    mode = "forward+backward" if backward else "forward"
    out = subprocess.run([sys.executable, "-m", "benchmarks.peak", case_name, impl, mode],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    from . import cases

    case_name, impl, mode = sys.argv[1:4]
    fn = cases.make(case_name).build(impl, mode == "forward+backward")
    print(common.peak_memory_bytes(fn))


if __name__ == "__main__":
    main()
