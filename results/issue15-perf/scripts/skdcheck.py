import torch, idd_ops
from idd_ops import reference
torch.manual_seed(0)
for (B, Cs, Ct, H, W, pool) in [(2, 4, 4, 5, 7, 2), (2, 3, 5, 6, 6, 3), (1, 4, 4, 9, 70, 2), (2, 3, 3, 4, 4, 1), (1, 2, 2, 1, 3, 2), (1, 3, 3, 40, 40, 4)]:
    s = torch.randn(B, Cs, H, W, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, Ct, H, W, dtype=torch.float64)
    for red in ["mean", "sum", "none"]:
        a = idd_ops.structural_kd_loss(s, t, pool, reduction=red)
        b = reference.structural_kd_loss(s, t, pool, reduction=red)
        torch.testing.assert_close(a, b)
        ga, = torch.autograd.grad(a.sum(), s); gb, = torch.autograd.grad(b.sum(), s)
        torch.testing.assert_close(ga, gb)
    assert torch.autograd.gradcheck(lambda x: idd_ops.structural_kd_loss(x, t, pool), (s,))
print("ok")
