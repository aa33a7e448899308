"""Street-layout vs per-pixel random labels at feature resolution (Cityscapes shape)."""
import os, sys
root = sys.argv[1]
sys.path.insert(0, root)
from benchmarks import common
import torch, idd_ops
ops = torch.ops.idd_ops
s, t, y, K = common.make_inputs(common.SHAPES["cityscapes"])
B, C, H, W = s.shape
yr = torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(1))
cs, ns = ops.class_centroids(s, y, K, 255); _, nr = ops.class_centroids(s, yr, K, 255)
g = torch.randn_like(cs)
s.requires_grad_()
sd = s.detach()
fns = {"cc fwd teacher": (lambda: ops.class_centroids(t, y, K, 255), lambda: ops.class_centroids(t, yr, K, 255)),
       "cc fwd student": (lambda: ops.class_centroids(sd, y, K, 255), lambda: ops.class_centroids(sd, yr, K, 255)),
       "cc bwd student": (lambda: ops._class_centroids_backward(g, y, ns, H, W, torch.float32, 255),
                          lambda: ops._class_centroids_backward(g, yr, nr, H, W, torch.float32, 255)),
       "IDD fwd+bwd": (common.loss_fn(idd_ops.inter_class_distance_loss, s, t, y, K, True),
                       common.loss_fn(idd_ops.inter_class_distance_loss, s, t, yr, K, True))}
for name, (a, b) in fns.items():
    ts = [common.time_interleaved([a, b], repeat=7) for _ in range(3)]
    ratios = sorted(r / st for st, r in ts)
    print(f"{root} {name}: street {' '.join('%.1f' % x[0] for x in ts)} ms, random {' '.join('%.1f' % x[1] for x in ts)} ms, random/street {ratios[0]:.2f}-{ratios[-1]:.2f}")
