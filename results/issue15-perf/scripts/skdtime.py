import os, sys
sys.path.insert(0, sys.argv[1])
from benchmarks import common, cases
import torch; torch.set_num_threads(int(os.environ.get("NT", "2")))
c = cases.make("skd pool2")
fns = [c.build("fused", True), c.build("reference", True)]
for _ in range(2):
    print(sys.argv[1], ["%.1f" % v for v in common.time_interleaved(fns, repeat=5)])
