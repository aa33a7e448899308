import os, sys
sys.path.insert(0, sys.argv[1])
from benchmarks import common, cases
import torch
c = cases.make("position_loss 512x1024")
for bw in (False, True):
    fns = [c.build("fused", bw), c.build("compiled", bw), c.build("reference", bw)]
    for f in fns: f()
    for _ in range(2):
        t = common.time_interleaved(fns, repeat=11)
        print(sys.argv[1], "fwd+bwd" if bw else "fwd", "fused %.2f compiled %.2f reference %.2f  compiled/fused %.2f" % (*t, t[1] / t[0]))
