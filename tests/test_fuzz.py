"""The differential fuzzer of tests/fuzz at a fixed seed: random cases of every public loss and
every op with CUDA kernels against the float64 reference, forward and backward, on the CPU
kernels and their alternative formulations, on the CUDA kernels under the emulator (6 s for the
three on 2 cores), and on a GPU with a larger budget (selected by `-m gpu`, as tools/gpu_check.sh
does). A failure prints each mismatch's reproducer:
`python -m tests.fuzz --targets TARGET --repro OP:SEED`.

Longer runs: `python -m tests.fuzz --targets cpu,cpu_alt,default --cases 5000 --seed N`, and
with `--size-scale 6` at larger maps (a few cases of those run here too).
"""
import pytest
import torch

from fuzz import runner, targets
from fuzz.targets import EMULATED

SEED = 20261202
CASES = 176  # per target: 11 of each of the 16 op generators
GPU_CASES = 640
LARGE_CASES = 48  # 3 of each op generator, at six times the sizes


def _run(target, cases):
    why = targets.unavailable(target)
    if why:
        pytest.skip(why)
    report = runner.run([target], cases, SEED)
    assert report.cases == cases
    if not report.ok:
        pytest.fail(report.summary(), pytrace=False)


@pytest.mark.parametrize("target", ["cpu", "cpu_alt", *EMULATED])
def test_fuzz_against_the_reference(target):
    """Emulated targets build the emulator as tests/test_cuda_emulated.py does (build.load(),
    cached in build/cuda_emu), and are skipped where it cannot be built here."""
    _run(target, CASES)


@pytest.mark.parametrize("target", ["cpu", "cpu_alt", *EMULATED])
def test_fuzz_at_six_times_the_sizes(target, monkeypatch):
    """Maps and channel counts up to six times their usual bound (fuzz.inputs.SIZE_SCALE): the
    kernels' plans of several blocks and segments, and resize ratios that small maps never reach
    (the reference resized labels by another rule than the kernels at 20 -> 216 rows). 3 to 8 s a
    target on 2 cores."""
    from fuzz import inputs

    monkeypatch.setattr(inputs, "SIZE_SCALE", 6)
    _run(target, LARGE_CASES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fuzz_on_cuda():
    """The GPU's own kernels (and rounding) on the kernel set IDD_OPS_CUDA_NEXT selects."""
    _run("cuda", GPU_CASES)


def test_drawn_half_features_stay_finite():
    """An offset of 100 times a scale of 1e3 is inf in float16: such a case compared the
    reference's 0 * inf (NaN at an absent class) with the library's 0, which said nothing of
    either. Offsets past float16's range are dropped, with the same draws."""
    import random

    from fuzz.inputs import FINITE_MAX, draw_feats

    rng = random.Random(0)
    specs = [draw_feats(rng, (1, 1, 1, 1), "float16") for _ in range(3000)]
    assert all(abs(s["offset"]) + 8 * s["scale"] <= FINITE_MAX["float16"] for s in specs)
    assert any(s["offset"] for s in specs)  # offsets that fit are still drawn


def test_no_allowance_passes_a_non_finite_difference():
    from fuzz.compare import Check

    assert not Check("grad:x", float("inf"), 1e-4, absolute=float("inf"), allowance=float("inf")).ok
    assert Check("grad:x", 2.0, 1e-4, absolute=2.0, allowance=float("inf")).ok


def test_coincident_classes_leave_the_euclidean_gradient_uncompared():
    """Identical images whose classes cover the same pixels, pooled by centroids="batch": two
    classes share one centroid exactly, the euclidean distance has no gradient there, and the
    default CUDA kernels' centroids (rounded apart by their atomics) gave a unit vector of rounding
    noise (found at seed 20261204). Its loss is still compared."""
    from fuzz.cases import make_case
    from fuzz.floors import coincident_classes

    case = make_case("idd", 20261204018384)
    x = case.spec.build(case.params, case.seed, "cpu")
    assert case.spec.floor(case.params, x)["grad:student"] == float("inf")
    # every class on one point (seed 20261205): the distances over their mean (0, floored at eps = 1e-8)
    # are the centroids' rounding over eps, which the default kernels' atomics round otherwise
    case = make_case("idd", 20261205011904)
    assert case.spec.floor(case.params, case.spec.build(case.params, case.seed, "cpu"))["loss"] > 1e4
    c = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]], dtype=torch.float64)
    assert coincident_classes(c, torch.tensor([[3, 1, 2]]))
    assert not coincident_classes(c, torch.tensor([[3, 0, 2]]))  # an absent class is no pair


def test_a_cosine_denominator_at_eps_leaves_the_gradient_uncompared():
    """IFVD with a pixel whose |f| |c| is 1.2e-7 above eps = 1e-3 (seed 20261240): float32 rounds
    it to either side, and the gradient of its class jumps between the floored and the projected
    branch (the emulated CUDA kernels 0.6 off, within 3e-7 with eps 1e-4 away). Its loss is still
    compared; the same case with eps = 1e-8 keeps its gradient check."""
    from fuzz.cases import make_case
    from fuzz.floors import near_cosine_floor

    case = make_case("ifvd", 20261240000598)
    x = case.spec.build(case.params, case.seed, "cpu")
    floors = case.spec.floor(case.params, x)
    assert floors["grad:student"] == float("inf") and floors["loss"] < float("inf")
    assert case.spec.floor(dict(case.params, eps=1e-8), x)["grad:student"] < float("inf")
    f = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]], dtype=torch.float64)  # |f| = 5 and 1, one row
    c = torch.tensor([[[2e-4, 0.0]]], dtype=torch.float64)  # |f0| |c| = 1e-3
    slots = torch.tensor([[[0, -1]]])
    u = 2.0 ** -24
    assert near_cosine_floor(f, c, slots, 1e-3, u)
    assert near_cosine_floor(f, c * (1 + 20 * u), slots, 1e-3, u)  # within 16 x (2 channels) roundoffs
    assert not near_cosine_floor(f, c * (1 + 40 * u), slots, 1e-3, u)
    assert not near_cosine_floor(f, c, torch.tensor([[[-1, 0]]]), 1e-3, u)  # that pixel ignored; 2e-4 at the other


def test_size_scale_reaches_larger_maps_and_names_itself_in_reproducers(monkeypatch):
    import random

    from fuzz import inputs
    from fuzz.cases import make_case
    from fuzz.compare import Outcome

    monkeypatch.setattr(inputs, "SIZE_SCALE", 8)
    rng = random.Random(0)
    sizes = [inputs.draw_size(rng, 0, 12) for _ in range(200)]
    batches = [inputs.draw_size(rng, 0, 3) for _ in range(200)]
    assert max(sizes) > 65 and max(sizes) <= 96  # past the tile sizes (17, 33, 65) drawn at any scale
    assert max(batches) <= 3  # batch sizes keep their bound, tile sizes included (memory)
    assert "--size-scale 8 --repro idd:5" in Outcome(make_case("idd", 5), "cpu").reproducer()


# Seed 20261210 (30,000 cases): cases whose every target disagreed with the float64 reference alike,
# at rounding the reference does not have; each passes once the allowance counts it.
ROUNDING_CASES = {
    # a few one-channel centroids drawn at random lie close together: the Gram form's distances
    "op.idd_tail:20261210007324": "grad:student", "op.idd_tail:20261210012892": "grad:student",
    "op.idd_tail:20261210015724": "grad:student", "op.idd_tail:20261210023420": "grad:student",
    # a "sum" of thousands of normalised cosine distances, every one rounding noise over eps
    "op.idd_tail:20261210014204": "loss",
    # float16 logits of 30-80 at T = 3.7: p_s - p_t far below either probability's rounding
    "cwd:20261210023156": "grad:student",
}


@pytest.mark.parametrize("name", sorted(ROUNDING_CASES))
def test_rounding_the_reference_lacks_is_allowed_for(name):
    from fuzz.cases import make_case
    from fuzz.compare import expected, run_on

    op, seed = name.split(":")
    case = make_case(op, int(seed))
    outcome = run_on(case, "cpu", expected(case))
    assert outcome.ok, outcome
    check = next(c for c in outcome.checks if c.what == ROUNDING_CASES[name])
    # past the tolerance, within the allowance, and not by orders of magnitude
    assert check.error > check.tolerance and 1e-4 < check.absolute / check.allowance <= 1, check


def test_tail_rounding_grows_as_a_pair_closes_in():
    from fuzz.distance_rounding import tail_rounding

    def floor(gap, metric="euclidean", normalize=False):
        sums = torch.tensor([[[3.0, 0.5], [1.0, 1.0], [1.0 + gap, 1.0]]], dtype=torch.float64)  # 0: the shift
        counts = torch.ones(1, 3, dtype=torch.long)
        return tail_rounding(sums, counts, sums * 2, counts, metric, normalize, 1e-8, "mean", 2.0 ** -53)

    for normalize in (False, True):  # a distance rounds at size^2 / (2 gap): as 1 / gap
        assert floor(1e-3, normalize=normalize)["grad:student"] > 50 * floor(1e-1, normalize=normalize)["grad:student"]
    # 1 - cos rounds at 1 whatever the gap; its gradient's rounding, relative to |c|, neither grows
    assert floor(1e-3, "cosine")["grad:student"] < 2 * floor(1e-1, "cosine")["grad:student"]


def test_tail_rounding_of_a_floored_cosine_denominator():
    """|ci| |cj| below eps: 1 - <ci, cj> / eps, of size 1 where 1 - cos is 0 (parallel classes:
    found at seed 20261221), and a gradient of |cj| / eps."""
    from fuzz.distance_rounding import network_terms

    c = torch.tensor([[[1e-3, 0.0], [2e-3, 0.0]]], dtype=torch.float64)
    counts = torch.ones(1, 2, dtype=torch.long)
    floored = network_terms(c, counts, "cosine", False, 1e-3, None, 2.0 ** -53)
    assert floored["R"][0, 0, 1].item() == pytest.approx(1 - 2e-6 / 1e-3)
    assert floored["g"][0, 0, 1].item() == pytest.approx(2e-3 / 1e-3)
    assert network_terms(c, counts, "cosine", False, 1e-8, None, 2.0 ** -53)["g"][0, 0, 1].item() == 0  # parallel


def test_networks_that_agree_exactly_keep_a_second_order_floor():
    """Two networks with the same normalised distances (E = 0 for every pair): the loss is the
    square of the rounding, not 0 (seed 20261221, a "sum" of three classes, two parallel)."""
    from fuzz.distance_rounding import tail_rounding

    sums = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    counts = torch.ones(1, 3, dtype=torch.long)
    floors = tail_rounding(sums, counts, sums * 3, counts, "cosine", True, 1e-8, "sum", 2.0 ** -53)
    assert 0 < floors["loss"] < 1e-10


def test_a_pair_at_distance_0_rounds_at_its_centroids_error_squared():
    """Two classes on one point: an error e in their centroids gives them |e|^2 (sqeuclidean) and
    |e| (euclidean), which a "mean" normaliser floored at eps then divides by eps (seed 20261221:
    a teacher whose pooled classes coincide, the default kernels' atomics 0.9 of the first-order
    allowance)."""
    from fuzz.distance_rounding import network_terms

    c = torch.tensor([[[1.0, 2.0], [1.0, 2.0]]], dtype=torch.float64)
    counts, dc, u = torch.ones(1, 2, dtype=torch.long), torch.full((1, 2), 3.0, dtype=torch.float64), 2.0 ** -24
    sq = network_terms(c, counts, "sqeuclidean", True, 1e-8, "mean", u, 2.0 ** -53, dc)
    assert sq["dR"][0, 0, 1].item() == pytest.approx(u * 6.0 ** 2)
    assert sq["da"][0, 0, 1].item() == pytest.approx(u * 6.0 ** 2 / 1e-8)
    assert network_terms(c, counts, "euclidean", False, 1e-8, "mean", u, 2.0 ** -53, dc)["dR"][0, 0, 1].item() == 6.0


# A planted gradient error of 1 % (runner.mutation_check): the share of the float32/float64 cases
# with a gradient to hold that still pass (seed 20261202, 300 cases: 1 of 173, 2 of 183 and 5 of
# 98; with the scale-free floors that distance_rounding replaced: 16 of 173, 15 of 181, 4 of 98).
@pytest.mark.parametrize("op,share", [("op.idd_tail", 0.01), ("class_distance_matrix", 0.03), ("idd", 0.06)])
def test_a_gradient_one_percent_off_fails(op, share):
    t = runner.mutation_check(op, 300, SEED, 1.01)
    held = t["caught"] + t["escaped"]
    assert held > 90 and t["failing"] == 0, t
    assert t["escaped"] <= share * held, t
