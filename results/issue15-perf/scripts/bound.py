import sys
sys.path.insert(0, sys.argv[1])
from benchmarks import common, cases
import torch
for name in ["idd_loss cityscapes", "idd_loss voc", "idd_loss ade20k"]:
    c = cases.make(name)
    f = c.build("fused", True)
    for _ in range(2):
        bw = common.copy_bandwidth_gbs(2**28)
        t = common.time_interleaved([f], repeat=7)[0]
        bound = c.bytes_moved(True) / (bw * 1e9) * 1e3
        print(sys.argv[1], name, "fwd+bwd %.1f ms, bw %.1f GB/s, bound %.1f ms, ratio %.2f" % (t, bw, bound, t / bound))
