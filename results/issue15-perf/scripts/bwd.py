import os, sys
sys.path.insert(0, os.getcwd())
from benchmarks import common
import torch, idd_ops
if os.environ.get("NT"): torch.set_num_threads(int(os.environ["NT"]))
ops = torch.ops.idd_ops
s, t, y, K = common.make_inputs(common.SHAPES["cityscapes"])
B, C, H, W = s.shape
yr = torch.randint(0, K, (B, H, W))
cs, ns = ops.class_centroids(s, y, K, 255); _, nr = ops.class_centroids(s, yr, K, 255)
g = torch.randn_like(cs)
dst = torch.empty_like(s)
fns = {"bwd street": lambda: ops._class_centroids_backward(g, y, ns, H, W, torch.float32, 255),
       "bwd rand": lambda: ops._class_centroids_backward(g, yr, nr, H, W, torch.float32, 255),
       "empty+fill": lambda: torch.empty_like(s).fill_(1.0),
       "fill existing": lambda: dst.fill_(1.0),
       "copy existing s->dst": lambda: dst.copy_(s),
       "fwd street s": lambda: ops.class_centroids(s, y, K, 255),
       "fwd rand s": lambda: ops.class_centroids(s, yr, K, 255),
       "s.sum": lambda: s.sum(),
       "fwd street t": lambda: ops.class_centroids(t, y, K, 255),
       "fwd rand t": lambda: ops.class_centroids(t, yr, K, 255),
       "t.sum": lambda: t.sum(),
       }
for rep in range(2):
    ts = common.time_interleaved(list(fns.values()), repeat=9)
    print("  ".join(f"{k}={v:.1f}" for k, v in zip(fns, ts)))
