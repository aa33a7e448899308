"""SKD in float32 around the pixels' mean direction: the study behind the formulation every SKD
path now takes (docs/METHOD.md 8; csrc/composite/affinity_loss.h, affinity_pivot), kept as a
standalone check of its identity. Prints the relative error of the float32 value and gradient
against float64, for the uncentred differenced Gram form the op took before, the pivoted form and
a float32 reference that forms the P x P affinities, as features share a growing common offset
and as the student nears its teacher. (The library forms the same sums with its own helpers and
takes a floored pixel's gradient uncentred; the tests hold it to these numbers.)

    python tools/skd_pivot_study.py     # about 10 s on 2 cores

The pivoted form. With S_i, T_i the normalised pooled features of pixel i, m_S, m_T their means
over the image's P pixels, x_i = S_i - m_S, y_i = T_i - m_T and d_i = x_i - y_i (the narrower
network padded with zero rows):
    A_S - A_T = alpha + beta_i + beta_j + E_ij,   alpha = |m_S|^2 - |m_T|^2,
    beta_i = <m_S, x_i> - <m_T, y_i>,             E_ij = <x_i, x_j> - <y_i, y_j>.
Since sum_i x_i = sum_i y_i = 0, the cross terms sum_ij (alpha + beta_i + beta_j) E_ij vanish:
    sum_ij (A_S - A_T)^2 = P^2 alpha^2 + 4 P alpha B1 + 2 P B2 + 2 B1^2 + sum_ij E_ij^2,
with B1 = sum beta_i, B2 = sum beta_i^2 (float64, O(P C)), and sum E^2 the op's differenced Gram
form over x and d instead of S and D. The gradient w.r.t. S_i is 4 (m_S r_i + w_i) with
r_i = P alpha + P beta_i + B1 and w_i = u + G_xd x_i + G_xy d_i (u = sum_j beta_j x_j); through the
normalisation, m_S's part projects to r_i (m_S - S_i <S_i, m_S>), formed in float64 per pixel.
Every term the Grams carry is of the size of the spread about the mean, not of the offset.
"""
import torch

EPS = 1e-12


def normalised(f):
    return f / f.norm(dim=0, keepdim=True).clamp_min(EPS)


def padded(x, rows):
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def differenced(x, y, acc):
    """sum_ij (<x_i, x_j> - <y_i, y_j>)^2 from the Grams of x and d = x - y (in `acc`), as the op."""
    C = max(x.shape[0], y.shape[0])
    xa, d = padded(x, C).to(acc), (padded(x, C) - padded(y, C)).to(acc)
    gxx, gxd, gdd = (a @ b.T for a, b in ((xa, xa), (xa, d), (d, d)))
    dot = lambda a, b: (a.double() * b.double()).sum()  # noqa: E731
    return 2 * dot(gxx, gdd) - 4 * dot(gdd, gxd) + dot(gdd, gdd) + 2 * dot(gxd, gxd.T)


def pivot_terms(S, T, centre=True):
    """(m_S, x, y, alpha, beta); with centre=False the pivots are 0 (x = S, y = T): the op's form."""
    mS, mT = (S.mean(1, keepdim=True), T.mean(1, keepdim=True)) if centre else (S[:, :1] * 0, T[:, :1] * 0)
    x, y = S - mS, T - mT
    return mS, x, y, (mS * mS).sum() - (mT * mT).sum(), (mS * x).sum(0) - (mT * y).sum(0)


def pivoted_value(S, T, acc):
    P = S.shape[1]
    _, x, y, alpha, beta = pivot_terms(S, T)
    B1, B2 = beta.sum(), (beta * beta).sum()
    return P * P * alpha ** 2 + 4 * P * alpha * B1 + 2 * P * B2 + 2 * B1 ** 2 + differenced(x, y, acc)


def pivoted_gradient(fs, ft, acc, centre=True):
    """d/d fs of the loss summed over the P x P entries (centre=False: the op's differenced form)."""
    norm = fs.norm(dim=0, keepdim=True)
    S, T = fs / norm.clamp_min(EPS), normalised(ft)
    (Cs, P), C = S.shape, max(S.shape[0], T.shape[0])
    mS, x, y, alpha, beta = pivot_terms(S, T, centre)
    r = P * alpha + P * beta + beta.sum()
    xa, ya = padded(x, C).to(acc), padded(y, C).to(acc)
    d = (padded(x, C) - padded(y, C)).to(acc)  # differenced before rounding, as the op's D
    w = x @ beta[:, None] + ((xa @ d.T) @ xa + (xa @ ya.T) @ d).double()[:Cs]
    along = mS - S * (S * mS).sum(0, keepdim=True)
    return 4 * (r * along + w - S * (S * w).sum(0, keepdim=True)) / norm


def loss(fs, ft):
    S, T = normalised(fs), normalised(ft)
    return ((S.T @ S - T.T @ T) ** 2).sum()


def autograd_gradient(fs, ft):
    f = fs.clone().requires_grad_()
    loss(f, ft).backward()
    return f.grad.double()


def features(Cs, Ct, P, offset, gap, seed):
    """float32-representable features: a per-channel offset (up to 2 x `offset`) on unit-spread
    noise; with `gap`, a student of the teacher's channels `gap` from it."""
    g = torch.Generator().manual_seed(seed)
    ft = torch.randn(Ct, P, generator=g, dtype=torch.float64) + offset * 2 * torch.rand(Ct, 1, generator=g,
                                                                                       dtype=torch.float64)
    if gap:
        fs = ft + gap * torch.randn(Ct, P, generator=g, dtype=torch.float64)
    else:
        fs = torch.randn(Cs, P, generator=g, dtype=torch.float64) + offset * 2 * torch.rand(
            Cs, 1, generator=g, dtype=torch.float64)
    return fs.float().double(), ft.float().double()


def main():
    print("| offset / spread | student | value: differenced f32 | pivoted f32 | reference f32 "
          "| gradient: differenced f32 | pivoted f32 | reference f32 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for offset, gap in [(0, 0), (1, 0), (3, 0), (10, 0), (30, 0), (100, 0), (0, 1e-4), (10, 1e-2), (10, 1e-4)]:
        fs, ft = features(128, 128 if gap else 256, 1024, offset, gap, seed=offset + 1)
        S, T = normalised(fs), normalised(ft)
        exact = loss(fs, ft)
        exact_grad = autograd_gradient(fs, ft)
        value = lambda v: f"{abs(float(v) / float(exact) - 1):.1e}"  # noqa: E731
        grad = lambda g: f"{float((g - exact_grad).abs().max() / exact_grad.abs().max()):.1e}"  # noqa: E731
        print(f"| {offset} | {f'{gap:g} from its teacher' if gap else 'its own features'} "
              f"| {value(differenced(S, T, torch.float32))} | {value(pivoted_value(S, T, torch.float32))} "
              f"| {value(loss(fs.float(), ft.float()))} | {grad(pivoted_gradient(fs, ft, torch.float32, centre=False))} "
              f"| {grad(pivoted_gradient(fs, ft, torch.float32))} "
              f"| {grad(autograd_gradient(fs.float(), ft.float()))} |")
        assert abs(float(pivoted_value(S, T, torch.float64)) / float(exact) - 1) < 1e-9  # the identity holds


if __name__ == "__main__":
    main()
