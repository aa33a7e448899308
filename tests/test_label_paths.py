"""The centroid, IDD and IFVD losses on label maps built to reach every branch of the
label-reading kernels (tests/labels.py names them), against the float64 reference, on every
device. The first tests check that each case's labels really contain what it claims."""
import pytest
import torch

import idd_ops
from idd_ops import reference
from conftest import TOLERANCES
from labels import CASES, IDS, TILE, at_feature_size, warp_kinds

BRANCHES = {"uniform", "ignored", "mixed", "tail", "partial-tile", "multi-tile", "absent", "same-size",
            "resize-down", "resize-up", "uint8", "int32", "ignore=-1", "clamped-cosine"}


def _reaches(case):
    """The branch names the case's labels, sizes and dtypes actually reach."""
    y = case.labels()
    reached = {k for k, n in warp_kinds(y, case.H, case.W, case.K, case.ignore_index).items() if n}
    counts = reference.class_centroids(torch.zeros(case.B, 1, case.H, case.W), y, case.K, case.ignore_index)[1]
    reached |= {"absent"} if bool((counts == 0).any()) else set()
    reached |= {"partial-tile"} if case.C % TILE else set()
    reached |= {"multi-tile"} if case.C > TILE else set()
    size, label_size = (case.H, case.W), (case.Hy, case.Wy)
    reached |= {"same-size"} if size == label_size else set()
    reached |= {"resize-down"} if case.Hy > case.H or case.Wy > case.W else set()
    reached |= {"resize-up"} if case.Hy < case.H or case.Wy < case.W else set()
    reached |= {{torch.uint8: "uint8", torch.int32: "int32"}.get(case.label_dtype, "int64")}
    reached |= {"ignore=-1"} if case.ignore_index == -1 else set()
    if case.zero_class >= 0:
        present = at_feature_size(y, case.H, case.W) == case.zero_class
        assert present.any() and float(case.feats()[present[:, None].expand(-1, case.C, -1, -1)].abs().max()) == 0
        reached.add("clamped-cosine")
    return reached


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_case_reaches_its_branches(case):
    assert set(case.targets) <= BRANCHES
    missing = set(case.targets) - _reaches(case)
    assert not missing, f"{case.id} claims {sorted(missing)} but its labels do not reach them"


def test_every_branch_has_a_case():
    assert set().union(*(c.targets for c in CASES)) == BRANCHES


def test_uniform_cases_are_mostly_uniform_warps():
    """The fast path of the CUDA centroid kernel carries the run cases, not a stray warp."""
    for case in CASES:
        if case.id.startswith("uniform-runs"):
            kinds = warp_kinds(case.labels(), case.H, case.W, case.K)
            assert kinds["uniform"] == case.B * case.H * case.W // 32, (case.id, kinds)


def _student(case, dtype, device):
    return case.feats(dtype=dtype, device=device).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_centroids(device, case, dtype):
    y = case.labels(device)
    x = _student(case, dtype, device)
    x64 = x.detach().double().requires_grad_()
    weight = torch.randn(case.B, case.K, case.C, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weight = weight.to(device)
    c, n = idd_ops.class_centroids(x, y, case.K, case.ignore_index)
    c_ref, n_ref = reference.class_centroids(x64, y, case.K, case.ignore_index)
    (c.double() * weight).sum().backward()
    (c_ref * weight).sum().backward()
    tol = TOLERANCES[dtype]
    assert torch.equal(n.cpu(), n_ref.cpu())
    torch.testing.assert_close(c.double(), c_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)


def _loss_and_grad(fn, case, device, **kwargs):
    s = _student(case, torch.float64, device)
    t = case.feats(C=case.C + 3, device=device, seed=1)
    loss = fn(s, t, case.labels(device), case.K, ignore_index=case.ignore_index, **kwargs)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_idd_loss(device, case):
    for kwargs in ({}, {"metric": "cosine", "normalize": "mean"}):
        got = _loss_and_grad(idd_ops.inter_class_distance_loss, case, device, **kwargs)
        want = _loss_and_grad(reference.inter_class_distance_loss, case, device, **kwargs)
        # a zero centroid (clamped-cosine) scales the cosine gradient by 1 / eps: float64's
        # summation orders then differ at 1e-8 of the largest gradient
        torch.testing.assert_close(got[0], want[0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=1e-7, atol=1e-7 * float(want[1].abs().max()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ifvd(device, case):
    got = _loss_and_grad(idd_ops.intra_class_variation_loss, case, device)
    want = _loss_and_grad(reference.intra_class_variation_loss, case, device)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_nearest_index_is_clamped_where_float_rounding_reaches_the_size(device):
    """The nearest index floor(dst * float(in / out)) rounds up to in_size for the last pixels of
    some very wide maps (5 label columns -> 9,718,272): the kernels clamp it to in_size - 1, as
    F.interpolate does. Guards that clamp: without it those pixels read label row 1's first value
    (class 4, which the one feature row, from label row 0, never sees)."""
    W = 9_718_272
    y = torch.tensor([[[0, 1, 2, 3, 1], [4, 4, 4, 4, 4]]], device=device)  # row 1 follows row 0 in memory
    slots = torch.ops.idd_ops._label_slots(y, 1, W, 5, 255)
    assert slots[0, 0, -1] == 1 and not (slots == 4).any()
    counts = idd_ops.class_centroids(torch.ones(1, 1, 1, W, device=device), y, 5)[1]
    assert counts[0, 4] == 0 and counts.sum() == W


def test_the_reference_resizes_by_the_float32_rule(device):
    """F.interpolate picks other rows for a float64 input than for a float32 one at some ratios (20
    -> 216 rows: row 14 for output row 162 in float32, 15 in float64); METHOD.md 1 and the kernels
    take the float32 rule, and the reference resized a float64 copy, so that every op disagreed with
    it there (found by the fuzzer at --size-scale 6). It now indexes by the float32 rule and keeps
    the label values as they are (ids past 2^24 too)."""
    y = torch.arange(20 * 98, device=device).reshape(1, 20, 98) * 9_000  # values past 2^24
    want = torch.nn.functional.interpolate(torch.arange(20 * 98.0).reshape(1, 1, 20, 98), size=(216, 196),
                                           mode="nearest")[0].long() * 9_000
    got = reference.resize_labels(y, (216, 196))
    assert torch.equal(got.cpu(), want) and got[0, 162, 0] == 14 * 98 * 9_000
    small = y % 7
    slots = torch.ops.idd_ops._label_slots(small, 216, 196, 7, 255).long()
    assert torch.equal(slots, reference.label_slots(small, (216, 196), 7, 255))
