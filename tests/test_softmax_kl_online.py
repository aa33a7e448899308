"""The one-read softmax-KL sums of the CUDA kernels
(csrc/common/softmax_kl_online.h), run on the host: chunked, split over partial sums and
merged as the kernels do, against the float64 reference, masked (-inf) classes included."""
import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension as ce

from idd_ops import reference

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("online") / "driver")
    includes = [f"-I{d}" for d in ce.include_paths()]
    subprocess.run([CXX, "-O2", "-std=c++17", *includes, os.path.join(HERE, "host", "softmax_kl_online_driver.cpp"),
                    "-o", exe], check=True, capture_output=True)
    return exe


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(60):
        L = int(torch.randint(1, 300, (1,), generator=g))
        u = torch.randn(L, generator=g, dtype=torch.float64) * 3
        v = torch.randn(L, generator=g, dtype=torch.float64) * 3
        kind = i % 6
        if kind == 1:  # far from zero: the maxima, not the values, carry the scale
            u, v = u + 60, v + 55
        elif kind == 2:  # masked teacher classes
            v[torch.rand(L, generator=g) < 0.4] = -math.inf
        elif kind == 3:  # a teacher -inf everywhere: KL 0, both lse +inf
            v[:] = -math.inf
        elif kind == 4:  # classes masked in both, one left
            both = torch.rand(L, generator=g) < 0.5
            u[both], v[both] = -math.inf, -math.inf
            u[0], v[0] = 0.5, 1.0
        elif kind == 5:  # student near the teacher: KL near 0
            u = v + 1e-3 * torch.randn(L, generator=g, dtype=torch.float64)
        u, v = u.float().double(), v.float().double()  # values a float kernel can hold exactly
        out.append((u, v, 1 + i % 9))
    return out


def run_driver(driver, data):
    """The driver's rows for (u, v, parts) cases: KL, lse_s, lse_t in float, then in double."""
    lines = [str(len(data))]
    for u, v, parts in data:
        lines += [f"{len(u)} {parts}", " ".join(map(repr, u.tolist())), " ".join(map(repr, v.tolist()))]
    result = subprocess.run([driver], input="\n".join(lines), capture_output=True, text=True, check=True)
    rows = [list(map(float, line.split())) for line in result.stdout.strip().splitlines()]
    assert len(rows) == len(data)
    return rows


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_a_tiny_kl_between_distant_maxima(driver):
    """Both vectors confident in one class, their maxima tens apart: the KL is far below
    |ms - mt|. A form that adds ms - mt at the end is off by roundoff at that size (a KL of
    1.7e-12 came out 0 at seed 20261210 of the fuzzer); with w kept relative to the maxima the
    error is what any w / zt - log zt + log zs form has: the mass outside the top class, which
    z = 1 + mass rounds away, and roundoffs of the KL itself."""
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(12):
        L = int(torch.randint(2, 200, (1,), generator=g))
        v = torch.randn(L, generator=g, dtype=torch.float64) * 3
        top = int(torch.randint(0, L, (1,), generator=g))
        v[top] += 40
        u = v * 1.5 + 25 if i % 2 else v * 0.8 - 30  # the same class on top, other gaps
        data.append((u.float().double(), v.float().double(), 1 + i % 5))
    for (u, v, parts), row in zip(data, run_driver(driver, data)):
        kl = reference._kl_rows(u[None], v[None], 1)[0].item()
        rest = torch.arange(len(u)) != int(v.argmax())
        mass = float(torch.exp(u - u.max())[rest].sum() + torch.exp(v - v.max())[rest].sum())
        assert 0 < kl < 1e-8 and abs(u.max() - v.max()) > 20
        for got, roundoff in ((row[0], 2.0 ** -24), (row[3], 2.0 ** -53)):  # float, double
            assert abs(got - kl) <= 2 * mass + 64 * roundoff * kl, (len(u), parts, got, kl, mass)


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_a_teacher_maximum_rising_past_half_the_float_range(driver):
    """A teacher maximum that rises by ~3e38 at once: the earlier terms vanish (exp underflows
    to 0), and moving them to the new maxima first computed zt * 3e38 = inf, then 0 * inf = NaN
    where the two-pass form gives log 3 (found by a review of the relative-w form)."""
    data = [(torch.zeros(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 3e38], dtype=torch.float64), parts)
            for parts in (1, 2, 3)]
    data.append((torch.zeros(2, dtype=torch.float64), torch.tensor([-2e38, 2e38], dtype=torch.float64), 2))
    for (u, v, parts), row in zip(data, run_driver(driver, data)):
        assert row[0] == pytest.approx(math.log(len(u)), rel=1e-6), (v.tolist(), parts, row)


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_online_sums_match_the_reference(driver):
    data = cases()
    rows = run_driver(driver, data)
    for (u, v, parts), row in zip(data, rows):
        kl = reference._kl_rows(u[None], v[None], 1)[0].item()
        lse_s = torch.logsumexp(u, 0).item()
        lse_t = torch.logsumexp(v, 0).item()
        if math.isinf(lse_t):  # the -inf rule (docs/METHOD.md): KL 0, both lse +inf (zero gradient)
            lse_s = lse_t = math.inf
        assert not any(math.isnan(x) for x in row), (len(u), parts, row)
        for got, want, tol in zip(row, [kl, lse_s, lse_t] * 2, [1e-4] * 3 + [1e-10] * 3):
            if math.isinf(want):
                assert got == want
            else:
                assert abs(got - want) <= tol * (1 + abs(want)), (len(u), parts, got, want)
