import torch, idd_ops, itertools
from idd_ops import reference
ops = torch.ops.idd_ops
print(ops._cpu_capability())
torch.manual_seed(0)
worst = 0
for (B, C, H, W, Hy, Wy, K) in [(2, 3, 5, 7, 5, 7, 4), (2, 16, 8, 8, 16, 16, 3), (3, 13, 9, 11, 30, 20, 5), (1, 8, 64, 64, 64, 64, 150), (2, 24, 16, 17, 16, 17, 2), (1, 1, 1, 1, 1, 1, 1)]:
    for mode in ["rand", "blocks"]:
        f = torch.randn(B, C, H, W, dtype=torch.float32)
        if mode == "rand":
            y = torch.randint(0, K + 1, (B, Hy, Wy)); y[y == K] = 255
        else:
            y = (torch.arange(Hy)[:, None] // 3 + torch.arange(Wy)[None] // 5).remainder(K + 1).expand(B, Hy, Wy).clone(); y[y == K] = 255
        c, n = ops.class_centroids(f, y, K, 255)
        cr, nr = reference.class_centroids(f.double(), y, K, 255)
        assert torch.equal(n, nr), (n, nr)
        worst = max(worst, (c.double() - cr).abs().max().item())
        g = torch.randn(B, K, C)
        gb = ops._class_centroids_backward(g, y, n, H, W, torch.float32, 255)
        fd = f.double().requires_grad_()
        cr2, _ = reference.class_centroids(fd, y, K, 255)
        (cr2 * g.double()).sum().backward()
        worst = max(worst, (gb.double() - fd.grad).abs().max().item())
print("worst abs err", worst)
