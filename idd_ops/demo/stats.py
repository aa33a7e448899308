"""Paired comparisons over seeds: mean difference with a Student-t confidence interval.

Every configuration of a seed starts from the same student initialisation and sees the same
batches, so the per-seed difference of two configurations cancels most of the seed-to-seed
spread that unpaired mean +/- std comparisons carry.
"""
import math
import statistics


def _t_cdf(t, df, intervals=2000):
    """P(T <= t) for Student's t with df degrees of freedom: 1/2 plus the density integrated
    from 0 to t by Simpson's rule (the density is smooth; 2000 intervals give ~1e-10 here)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x):
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = t / intervals
    total = density(0.0) + density(t)
    total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 0.5 + total * h / 3


def t_quantile(p, df):
    """The p-quantile of Student's t (0 < p < 1) by bisection on its CDF."""
    lo, hi = -100.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a, b, level=0.95):
    """Mean of a[i] - b[i] over paired seeds with its two-sided t interval at `level`:
    ``(mean, low, high, n)``; the interval is (nan, nan) with fewer than two pairs."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else float("nan")
    if n < 2:
        return mean, float("nan"), float("nan"), n
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half, n
