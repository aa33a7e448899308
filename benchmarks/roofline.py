"""Roofline bounds: the least time an op's work can take on this machine, and what binds it.

An op's work (see benchmarks/cases.py) is three numbers: bytes it must move (one read of every
input, one write of the student's gradient), GEMM flops (the matrix products its definition
contains, 2 per multiply-add) and exps (softmax-KL: one per logit of each network). Its bound is

    max(bytes / copy bandwidth, flops / GEMM rate, exps / exp rate)

with all three rates measured in the same run: the copy bandwidth beside each row
(`common.CopyProbe`), the arithmetic peaks once (`Rates`). Elementwise and reduction arithmetic
(centroid sums, cosines, squared errors: a few operations per element moved) is left to the
memory term. The bound assumes one pass over the data, so a forward+backward counts the
forward's exps once although a backward that keeps only log-sum-exps computes them again.
A pass that only reads can beat the copy's rate (a copy also fetches each destination line
before it writes it), so a forward can show fused / bound slightly below 1.
"""
import dataclasses

import torch

from . import common


@dataclasses.dataclass(frozen=True)
class Work:
    """bytes: bytes moved at least; flops: GEMM flops, done at the rate of a bmm of `gemm_shape`
    (b, m, k, n), or (b, m, k, n, dtype name) for another dtype than float32; exps: exponentials."""
    bytes: float
    flops: float = 0.0
    exps: float = 0.0
    gemm_shape: tuple = None


def bound(work, copy_bps, gemm_fps, exp_eps):
    """(least time in ms, binding resource) for `work`. copy_bps: bytes/s (read + write);
    gemm_fps: flop/s of the GEMM at work.gemm_shape (ignored without flops); exp_eps: exps/s."""
    terms = {"memory": work.bytes / copy_bps}
    if work.flops:
        terms["GEMM"] = work.flops / gemm_fps
    if work.exps:
        terms["exp"] = work.exps / exp_eps
    resource = max(terms, key=terms.get)
    return terms[resource] * 1e3, resource


def best_ms(fn, device="cpu", samples=3, min_ms=None):
    """Shortest per-call time of `samples` timings of fn() (after one warm-up call), in ms: the
    rates are peaks, and on a shared machine most samples meet other jobs. Each timing is one
    call on the CPU; on a GPU (min_ms 1 by default) a loop of back-to-back calls lasting at least
    min_ms, after the 0.1 s that brings the GPU's clocks up from idle: one call and its
    synchronise measure the launch latency, not the rate (an H200 timed a 2x19x256x19 bmm at
    15 GFLOP/s that way, which made the GEMM term of small IDD rows their bound)."""
    on_cuda = torch.device(device).type == "cuda"
    min_ms = (1.0 if on_cuda else 0.0) if min_ms is None else min_ms
    if min_ms <= 0:
        return common.time_interleaved([fn], device, repeat=samples, settle_s=0, stat=min)[0]
    calls, warmup, settle_s = 1, 1, (None if on_cuda else 0)

    def loop():
        for _ in range(calls):
            fn()
    while True:  # calls doubled until a loop lasts min_ms (2^12 calls at most)
        ms = common.time_interleaved([loop], device, repeat=1, warmup=warmup, settle_s=settle_s, stat=min)[0]
        warmup, settle_s = 0, 0
        if ms >= min_ms or calls >= 4096:
            break
        calls *= 2
    return common.time_interleaved([loop], device, repeat=samples, warmup=0, settle_s=0, stat=min)[0] / calls


def peak_rate(measure, device="cpu"):
    """measure() -> a rate with torch's current threads. On the CPU, the larger of that and the
    threads times the one-thread rate (a roofline's peak: per-core rate x cores), as on a shared
    machine each parallel call waits for its last thread to be scheduled, which can cost
    milliseconds a call and is not the rate the cores have."""
    rate = measure()
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        try:
            rate = max(rate, threads * measure())
        finally:
            torch.set_num_threads(threads)
    return rate


def gemm_rate(shape, device="cpu", repeat=3):
    """Flop/s of torch.bmm on [b, m, k] x [b, k, n], float32 unless a fifth entry names the
    dtype (best of `repeat` timings, best_ms; peak_rate)."""
    b, m, k, n, *dtype = shape
    dtype = getattr(torch, dtype[0]) if dtype else torch.float32
    x, y = torch.randn(b, m, k, device=device, dtype=dtype), torch.randn(b, k, n, device=device, dtype=dtype)
    return peak_rate(lambda: 2 * b * m * k * n / (best_ms(lambda: torch.bmm(x, y), device, repeat) * 1e-3), device)


def exp_elements(device="cpu"):
    """Elements of the exp-throughput tensor: small enough that input and output stay in cache
    (CPU: 2^16 floats = 256 KiB per thread, in and out within a 1 MiB L2; GPU: 16 MiB, within
    an H100's or H200's L2), large enough that every core or SM works on it."""
    return 2**22 if torch.device(device).type == "cuda" else 2**16 * torch.get_num_threads()


# The GPU's exp rate: a kernel of four independent chains of CHAIN_STEPS float exps per element
# (compiled at run time by torch's jiterator), so the exp units, not memory, set its time. One
# torch.exp per element (the CPU's probe) is bound by L2 bandwidth on a GPU: an H200 measured
# 632 G/s that way, several times under what its exp units give, which made the exp term of
# softmax-KL rows the larger one and their bound too loose.
CHAIN_STEPS = 64
_EXP_CHAINS = """
template <typename T> T exp_chains(T x) {
  float a = x, b = a + 0.25f, c = a + 0.5f, d = a + 0.75f;
  for (int i = 0; i < %d; ++i) {
    a = expf(-a);
    b = expf(-b);
    c = expf(-c);
    d = expf(-d);
  }
  return T(a + b + c + d);
}
""" % CHAIN_STEPS


def _exp_chains_rate(x, samples):
    """Exps/s of the jiterator chain kernel over x (float32 on a GPU)."""
    chains = torch.cuda.jiterator._create_jit_fn(_EXP_CHAINS)
    out = chains(x)
    if not torch.isfinite(out).all():
        raise RuntimeError("the exp chain kernel gave non-finite values")
    return x.numel() * 4 * CHAIN_STEPS / (best_ms(lambda: chains(x), x.device, samples) * 1e-3)


def exp_rate(device="cpu", samples=None):
    """(exps/s, how measured): float32 exps of a cache-resident tensor, the best of `samples`.
    CPU: torch.exp, one call a sample (peak_rate). GPU: the jiterator chain kernel
    (_EXP_CHAINS), calls back to back for 1 ms a sample (best_ms); where that kernel cannot be
    built, torch.exp the same way, a rate L2 bandwidth may set. Both use the library
    exp of their device (the CUDA kernels' exp is expf; the fused CPU kernels have a cheaper one
    and can beat this rate: their fused / bound is then below 1)."""
    on_cuda = torch.device(device).type == "cuda"
    x = torch.rand(exp_elements(device), device=device) - 1
    if on_cuda:
        try:
            return _exp_chains_rate(x, samples or 5), f"{CHAIN_STEPS * 4} expf per element in one kernel"
        except Exception as error:  # no NVRTC, or a torch without jiterator
            fallback = f"torch.exp, the chain kernel failed: {type(error).__name__}: {str(error)[:120]}"
    samples = samples or (5 if on_cuda else 100)
    rate = peak_rate(lambda: x.numel() / (best_ms(lambda: torch.exp(x), device, samples) * 1e-3), device)
    return rate, fallback if on_cuda else "torch.exp"


class Rates:
    """The machine's arithmetic rates, peaks measured once per run: exp throughput up front,
    each GEMM shape's rate on first use. The copy bandwidth comes with each row (common.CopyProbe)."""

    def __init__(self, device="cpu"):
        self.device = device
        self.exp_eps, self.exp_source = exp_rate(device)
        self.gemm_fps = {}

    def bound(self, work, copy_bps):
        """(ms, resource) of `work` at copy bandwidth copy_bps, measuring its GEMM shape's rate
        if new."""
        if work.flops and work.gemm_shape not in self.gemm_fps:
            self.gemm_fps[work.gemm_shape] = gemm_rate(work.gemm_shape, self.device)
        return bound(work, copy_bps, self.gemm_fps.get(work.gemm_shape), self.exp_eps)

    def describe(self):
        gemms = "; ".join(f"bmm {'x'.join(map(str, s))} (b x m x k x n): {r / 1e9:.0f} GFLOP/s"
                          for s, r in self.gemm_fps.items())
        source = getattr(self, "exp_source", "torch.exp")
        return (f"exp {self.exp_eps / 1e9:.2f} G/s ({source}, {exp_elements(self.device) * 4 // 1024} KiB "
                f"in cache)" + (f"; {gemms}" if gemms else ""))
