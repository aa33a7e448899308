"""One case on one target against the float64 reference: forward outputs and input gradients,
each as a normwise relative error, against a tolerance from the case's precision.

Error: ``max |got - want| / max |want|`` over the entries where the reference is finite
(absolute where the reference is all 0); non-finite entries must agree exactly (NaN with NaN,
+inf with +inf): METHOD.md states where a loss is NaN or infinite, and a finite loss where the
reference has NaN (or the reverse) is a bug either side. Integer outputs (counts, slots) must be
equal.

Tolerance: ``min(max(TOLERANCES[precision], RELAX x the error of the reference run in the
case's own dtype), RELAX_CAP)``. TOLERANCES (tests/conftest.py) are what the rest of the suite
holds the ops to at well-conditioned inputs. A random case can be ill-conditioned (classes
nearly merged, a cosine far from 0, logits of 100 at T = 3.7): there even the plain-PyTorch
reference in float32 is far from float64, and the fused op is held to a small multiple of that
instead, the form of the contracts in METHOD.md 8 ("within 3x the float32 reference's error").
A float64 case is measured the same way, by the reference in float32, its error scaled by the
ratio of the two unit roundoffs (2^-29). The cap keeps a wrong value from passing where the
reference's own error is enormous (a value that is 0 but for rounding).

Noise allowance: a scale-free output (cosines, normalised affinities, distances over their
mean: terms of size 1 whatever the inputs' scale) is 0 with a zero gradient in degenerate cases
(a pixel that is its own class, one pooled pixel, one class pair, one channel); both sides are
then rounding noise, and their relative error means nothing. Such outputs pass where their
absolute error is within NOISE_ULPS roundoffs of the terms they are made of (OpSpec.floor
gives the terms' size). The IDD losses and the distance matrix have a first-order model of their
rounding instead (distance_rounding.py), FIRST_ORDER_ULPS of whose roundoffs they may be off by
(floors.scaled_floors).

The gradient is that of ``sum(w * out)`` over the float outputs, w a fixed random weight in
[0.5, 1.5] per element: every element of every output reaches the gradient.
"""
import math
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import conftest

from . import inputs
from .cases import Case
from .floors import NOISE_ULPS, UNIT_ROUNDOFF, least_precise
from .targets import EMULATED, device_of, running_on

# the suite's tolerances (tests/conftest.py), by precision name: the float64 entry is for
# exact-math paths; float16 and bfloat16 round outputs at 2^-11 and 2^-8
TOLERANCES = {str(dtype).removeprefix("torch."): tol for dtype, tol in conftest.TOLERANCES.items()}
# How much worse than the reference in the case's own dtype an ill-conditioned case may be: the
# reference's rounding is one draw of many (a different summation order doubles it easily).
RELAX = 10.0
RELAX_CAP = 1.0
# float64's unit roundoff over float32's: the float32 reference's error, scaled to float64
ROUNDOFF_RATIO = 2.0 ** -29


def _has_offset(case: Case) -> bool:
    return any(isinstance(v, dict) and v.get("offset") for v in case.params.values())


def _cuda_set(target: str) -> bool:
    """The CUDA kernels: emulated, or on a GPU."""
    return target in EMULATED or target == "cuda"


# Known differences (docs/METHOD.md 8, tests/conftest.py's EMULATED_CUDA_DIFFERENCES): a mismatch
# of a case they match is counted as known, not as a failure: (predicate(case, target), why[, bound]),
# with a bound: only while every failing check's error is within bound x its tolerance.
KNOWN = [
    (lambda case, target: _cuda_set(target) and case.op == "op.class_centroids" and _has_offset(case),
     "the raw centroid op's CUDA kernel adds raw values in float atomics and loses a common offset (issue 25; "
     "METHOD.md 8); the public functions take the class-sum path there, which keeps it"),
    (lambda case, target: _cuda_set(target) and case.op == "skd" and case.params["student"]["dtype"] == "bfloat16",
     "CUDA's SKD keeps bfloat16 GEMM operands (tensor cores, as autocast's own GEMMs): its gradient is 1e-2 of "
     "float64 at 128/512 channels and up to 7e-2 with a few student channels (ARCHITECTURE.md)", 2.0),
    (lambda case, target: case.op == "op.idd_tail" and case.params["close"] and case.params["metric"] != "cosine"
     and (case.params["dtype"] == "float32" or (case.params["dtype"] is None
                                                 and case.params["student"]["dtype"] == "float32")),
     "the K x K math in float32 (the raw op's option; the public functions ask float64) rounds |ci|^2 + |cj|^2 "
     "- 2 <ci, cj> at the centroids' spread, which a close pair's distance does not survive (METHOD.md 8); the "
     "reference subtracts the centroids pair by pair (found at --size-scale 6)"),
    # found by this fuzzer (2026-12-02, seed 20261204), documented, not fixed:
    (lambda case, target: case.op == "class_distance_matrix" and case.params["centroids"]["dtype"] == "float64"
     and case.params["close"] and case.params["metric"] == "euclidean",
     "float64 euclidean distances through the Gram form keep about u * (spread / d)^2 of a close pair's gradient "
     "(4e-3 at a pair 1e-6 of the spread apart); the rounding of float32 inputs alone moves that gradient about "
     "100x more (METHOD.md 8)"),
]


@dataclass
class Check:
    what: str  # an output name, or "grad:<input>"
    error: float  # normwise relative
    tolerance: float
    note: str = ""
    absolute: float = float("inf")  # max |got - want|
    allowance: float = 0.0  # the noise allowance on it

    @property
    def ok(self) -> bool:
        # a non-finite disagreement (absolute inf) passes no allowance, an unlimited one included
        return self.error <= self.tolerance or (math.isfinite(self.absolute) and self.absolute <= self.allowance)

    @property
    def ratio(self) -> float:
        """How far past its limit (<= 1: passes)."""
        r = self.error / self.tolerance if self.tolerance else (0.0 if self.error == 0 else float("inf"))
        return min(r, self.absolute / self.allowance) if self.allowance else r


@dataclass
class Outcome:
    case: Case
    target: str
    checks: List[Check] = field(default_factory=list)
    raised: Optional[str] = None  # the target's exception, shortened
    known: Optional[str] = None  # why a failed case is a known difference

    @property
    def ok(self) -> bool:
        return self.raised is None and all(c.ok for c in self.checks)

    @property
    def worst(self) -> float:
        return max((c.error for c in self.checks), default=0.0)

    def reproducer(self) -> str:
        bad = [f"{c.what}: error {c.error:.3g} > tolerance {c.tolerance:.3g}{c.note}" + (
            f" (absolute {c.absolute:.3g} > noise allowance {c.allowance:.3g})" if c.allowance else "")
            for c in self.checks if not c.ok]
        if self.raised:
            bad.append(f"raised {self.raised}")
        head = f"[{self.target}] {self.case.op} seed={self.case.seed}" + (f" (known: {self.known})" if self.known
                                                                            else "")
        scale = f" --size-scale {inputs.SIZE_SCALE}" if inputs.SIZE_SCALE != 1 else ""
        return (f"{head}\n    " + "\n    ".join(bad) + f"\n    case: {self.case.params}\n"
                f"    rerun: python -m tests.fuzz --targets {self.target}{scale} --repro {self.case.op}:{self.case.seed}")


@dataclass
class Expected:
    """The reference's results for a case, computed once and shared by its targets."""
    outputs: Dict[str, torch.Tensor]  # forward outputs and "grad:<input>" gradients, float64 reference
    own_dtype_error: Dict[str, float]  # the same reference in the case's dtype: its error against float64
    precision: str
    floors: Dict[str, float] = field(default_factory=dict)  # OpSpec.floor
    raised: Optional[str] = None


def precision_of(case: Case, inputs) -> str:
    """The case's stated precision, else its least precise floating input."""
    if "precision" in case.params:
        return case.params["precision"]
    return least_precise(inputs.values())


def _weights(out: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(out.shape, generator=g, dtype=torch.float64)).to(out.device)


def evaluate(call, inputs, grads, seed):
    """Forward `call(inputs)` and the gradients of the weighted float outputs w.r.t. the inputs
    named in `grads` that require grad: {name: tensor} (on the CPU, detached)."""
    out = call(inputs)
    result = {k: v.detach() for k, v in out.items()}
    wrt = [k for k in grads if inputs[k].requires_grad]
    diff = [(k, v) for k, v in out.items() if v.is_floating_point() and v.requires_grad]
    if wrt and diff:
        total = sum((v.double() * _weights(v, seed + i)).sum() for i, (k, v) in enumerate(diff))
        got = torch.autograd.grad(total, [inputs[k] for k in wrt], allow_unused=True)
        for k, g in zip(wrt, got):
            result["grad:" + k] = torch.zeros_like(inputs[k]) if g is None else g.detach()
    return {k: v.cpu() for k, v in result.items()}


def _as_reference(inputs, grads, dtype=None):
    """CPU copies of the inputs (floating ones in `dtype`, or their own), as fresh leaves."""
    out = {}
    for k, x in inputs.items():
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.to(dtype or x.dtype).clone().requires_grad_(k in grads and inputs[k].requires_grad)
        out[k] = x
    return out


def error(got: torch.Tensor, want: torch.Tensor):
    """(normwise relative error, note, absolute error) of `got` against `want`; inf where they
    cannot agree."""
    if tuple(got.shape) != tuple(want.shape):
        return float("inf"), f" (shape {tuple(got.shape)}, want {tuple(want.shape)})", float("inf")
    if not want.is_floating_point():
        return (0.0, "", 0.0) if torch.equal(got.long(), want.long()) else (float("inf"), " (integers differ)",
                                                                           float("inf"))
    got, want = got.double(), want.double()
    bad = ~torch.isfinite(want)
    if not torch.equal(~torch.isfinite(got), bad) or not torch.equal(
            got[bad].nan_to_num(0.0, 1.0, -1.0), want[bad].nan_to_num(0.0, 1.0, -1.0)):
        n = int((torch.isnan(got) != torch.isnan(want)).sum() + (torch.isinf(got) != torch.isinf(want)).sum())
        return float("inf"), f" (non-finite entries differ: {n}; got {got.flatten()[:4].tolist()}...)", float("inf")
    if not want.numel() or bad.all():
        return 0.0, "", 0.0
    d = (got[~bad] - want[~bad]).abs().max().item()
    scale = want[~bad].abs().max().item()
    return (d / scale if scale > 0 else d), "", d


def expected(case: Case) -> Expected:
    """The float64 reference's outputs and gradients, on CPU inputs built from the case."""
    spec = case.spec
    inputs = spec.build(case.params, case.seed, "cpu")
    precision = precision_of(case, inputs)
    floors = spec.floor(case.params, inputs) if spec.floor else {}
    try:
        ref = evaluate(lambda x: spec.reference(x, case.params), _as_reference(inputs, spec.grads, torch.float64),
                       spec.grads, case.seed)
    except Exception as e:
        return Expected({}, {}, precision, floors, raised=_short(e))
    own = {}
    try:  # the reference in the case's own dtypes (half types accumulate in float32 there too), or in float32
        lower = torch.float32 if precision == "float64" else None
        mine = evaluate(lambda x: spec.reference(x, case.params), _as_reference(inputs, spec.grads, lower),
                        spec.grads, case.seed)
        ratio = ROUNDOFF_RATIO if precision == "float64" else 1.0
        own = {k: error(mine[k], ref[k])[0] * ratio for k in ref if k in mine}
        # a non-finite disagreement (float32 overflowing where float64 does not) says nothing of rounding
        own = {k: e for k, e in own.items() if e < float("inf")}
    except Exception:  # some reference ops lack a half kernel on the CPU: no relaxation then
        pass
    return Expected(ref, own, precision, floors)


def run_on(case: Case, target: str, want: Expected, grad_scale: float = 1.0) -> Outcome:
    """The case on `target`, compared with the reference's results `want`; the target's input
    gradients times `grad_scale` (a planted error: runner.mutation_check)."""
    spec = case.spec
    outcome = Outcome(case, target)
    try:
        with running_on(target, case.seed):
            inputs = spec.build(case.params, case.seed, device_of(target))
            got = evaluate(lambda x: spec.fused(x, case.params), inputs, spec.grads, case.seed)
        got = {k: v * grad_scale if k.startswith("grad:") else v for k, v in got.items()}
    except Exception as e:
        got = None
        outcome.raised = _short(e)
    if want.raised:
        if got is not None:  # the target ran where the reference raised: report it, it is a defect somewhere
            outcome.checks.append(Check("reference", float("inf"), 0.0, f" (the reference raised {want.raised})"))
        else:
            outcome.raised = None  # both raise: they agree that the case is invalid
        return _classify(outcome)
    if got is None:
        return _classify(outcome)
    base, u = TOLERANCES[want.precision], UNIT_ROUNDOFF[want.precision]
    for what, w in want.outputs.items():
        if what not in got:
            outcome.checks.append(Check(what, float("inf"), base, " (missing: no gradient)"))
            continue
        if got[what].dtype in (torch.float16, torch.bfloat16):  # as the library casts: overflow to inf included
            w = w.to(got[what].dtype).double()
        err, note, d = error(got[what], w)
        tol = min(max(base, RELAX * want.own_dtype_error.get(what, 0.0)), max(base, RELAX_CAP))
        outcome.checks.append(Check(what, err, tol, note, d, NOISE_ULPS * u * want.floors.get(what, 0.0)))
    return _classify(outcome)


def _classify(outcome: Outcome) -> Outcome:
    if not outcome.ok:
        for applies, why, *within in KNOWN:
            # an entry with a bound is known only as far as it reaches: a larger error is a failure
            bounded = not within or (outcome.raised is None and all(c.ok or c.error <= within[0] * c.tolerance
                                                                     for c in outcome.checks))
            if applies(outcome.case, outcome.target) and bounded:
                outcome.known = why
    return outcome


def _short(e: Exception) -> str:
    """The exception's type and first line, and the innermost frame of the library or the tests."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "idd_ops" in f.filename or "tests" in f.filename]
    where = f" at {frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}{where}"
