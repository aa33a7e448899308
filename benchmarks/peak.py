"""Peak extra CPU memory of one IDD-loss call, measured in a fresh process.

In a long-lived process, memory freed by an earlier call is reused and hides a later call's
allocations, so each measurement starts its own interpreter:
    python -m benchmarks.peak {fused,reference} SHAPE {forward,forward+backward}
prints the bytes by which the peak resident set grew while the call ran.
"""
import subprocess
import sys

from . import common


def measure(impl, shape_name, backward):
    mode = "forward+backward" if backward else "forward"
    out = subprocess.run([sys.executable, "-m", "benchmarks.peak", impl, shape_name, mode],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    impl, shape_name, mode = sys.argv[1:4]
    import idd_ops
    from idd_ops import reference

    fn_impl = {"fused": idd_ops.inter_class_distance_loss, "reference": reference.inter_class_distance_loss}[impl]
    s, t, y, K = common.make_inputs(common.SHAPES[shape_name])
    s.requires_grad_()
    fn = common.loss_fn(fn_impl, s, t, y, K, mode == "forward+backward")
    print(common.peak_memory_bytes(fn))


if __name__ == "__main__":
    main()
