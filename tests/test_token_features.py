"""[B, N, C] token features with an explicit size=(H, W) (ViT / SegFormer students): class_centroids,
IDD, IFVD and their modules equal the [B, C, H, W] map they tile, in value and gradient; the
reference twins take the same argument; the features are read in place; bad input is named."""
import math

import pytest
import torch

import idd_ops
from idd_ops import reference
from conftest import make_feats, make_labels

ops = torch.ops.idd_ops


def _tokens(B, C, H, W, device, seed=0):
    """[B, N, C] tokens and the [B, C, H, W] map they tile."""
    tokens = make_feats(B, H * W, C, 1, device=device, seed=seed)[..., 0]
    return tokens, tokens.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()


def test_token_centroids_match_reference(device):
    tokens, fmap = _tokens(2, 6, 7, 9, device)
    y = make_labels(2, 21, 27, 5, device=device)
    ta = tokens.detach().clone().requires_grad_()
    fb = fmap.detach().clone().requires_grad_()
    ca, na = idd_ops.class_centroids(ta, y, 5, size=(7, 9))
    cb, nb = reference.class_centroids(fb, y, 5)
    assert torch.equal(na, nb)
    torch.testing.assert_close(ca, cb)
    weight = torch.randn_like(cb)
    (ca * weight).sum().backward()
    (cb * weight).sum().backward()
    assert ta.grad.shape == tokens.shape and ta.grad.is_contiguous()
    torch.testing.assert_close(ta.grad, fb.grad.permute(0, 2, 3, 1).reshape_as(tokens))


@pytest.mark.parametrize("teacher_tokens", [False, True])
def test_token_student_idd_matches_reference(device, teacher_tokens):
    s_tok, s_map = _tokens(2, 6, 8, 10, device, seed=1)
    t_tok, t_map = _tokens(2, 9, 8, 10, device, seed=2)
    teacher = t_tok if teacher_tokens else make_feats(2, 9, 4, 5, device=device, seed=3)
    t_ref = t_map if teacher_tokens else teacher
    y = make_labels(2, 16, 20, 5, device=device)
    sa = s_tok.detach().clone().requires_grad_()
    sb = s_map.detach().clone().requires_grad_()
    la = idd_ops.inter_class_distance_loss(sa, teacher, y, 5, normalize="mean", size=(8, 10))
    lb = reference.inter_class_distance_loss(sb, t_ref, y, 5, normalize="mean")
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(sa.grad, sb.grad.permute(0, 2, 3, 1).reshape_as(s_tok))


@pytest.mark.parametrize("teacher_tokens", [False, True])
def test_token_ifvd_and_modules_match_the_map_form(device, teacher_tokens):
    """IFVD takes tokens with size=(H, W) as IDD does, and the modules of both pass size through
    (InterClassDistanceLoss once had no way to take it)."""
    s_tok, s_map = _tokens(2, 6, 8, 10, device, seed=1)
    t_tok, t_map = _tokens(2, 9, 8, 10, device, seed=2)
    teacher = t_tok if teacher_tokens else t_map
    y = make_labels(2, 16, 20, 5, device=device)
    pairs = [(idd_ops.intra_class_variation_loss, reference.intra_class_variation_loss, dict(reduction="none")),
             (idd_ops.nn.IntraClassVariationLoss(5), reference.intra_class_variation_loss, {}),
             (idd_ops.nn.InterClassDistanceLoss(5), reference.inter_class_distance_loss, {})]
    for fused, ref, kw in pairs:
        sa = s_tok.detach().clone().requires_grad_()
        sb = s_map.detach().clone().requires_grad_()
        la = fused(sa, teacher, y, **({} if isinstance(fused, torch.nn.Module) else {"num_classes": 5}), **kw,
                   size=(8, 10))
        lb = ref(sb, t_map, y, 5, **kw)
        torch.testing.assert_close(la, lb)
        la.sum().backward()
        lb.sum().backward()
        torch.testing.assert_close(sa.grad, sb.grad.permute(0, 2, 3, 1).reshape_as(s_tok))


@pytest.mark.parametrize("name", ["class_centroids", "inter_class_distance_loss", "intra_class_variation_loss"])
def test_reference_takes_tokens_as_the_fused_function(name):
    """The reference twins take the same `size` argument (API.md): tokens there equal the map."""
    s_tok, s_map = _tokens(2, 6, 8, 10, "cpu", seed=1)
    t_tok, t_map = _tokens(2, 9, 8, 10, "cpu", seed=2)
    y = make_labels(2, 16, 20, 5)
    args = (s_tok, y, 5) if name == "class_centroids" else (s_tok, t_tok, y, 5)
    map_args = (s_map, y, 5) if name == "class_centroids" else (s_map, t_map, y, 5)
    got, want = getattr(reference, name)(*args, size=(8, 10)), getattr(reference, name)(*map_args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, getattr(idd_ops, name)(*args, size=(8, 10)))
    with pytest.raises(ValueError, match="size"):  # as the fused function: no token input takes it
        getattr(reference, name)(*map_args, size=(8, 10))


def test_a_size_without_token_inputs_is_an_error():
    s, t, y = make_feats(2, 4, 3, 4), make_feats(2, 5, 3, 4), make_labels(2, 3, 4, 3)
    with pytest.raises(ValueError, match="size: only \\[B, N, C\\] token inputs take a size, but feats is"):
        idd_ops.class_centroids(s, y, 3, size=(3, 4))
    with pytest.raises(ValueError, match="student_feats, teacher_feats are \\[B, C, H, W\\] maps"):
        idd_ops.inter_class_distance_loss(s, t, y, 3, size=(3, 4))
    with pytest.raises(ValueError, match="size: only"):
        idd_ops.intra_class_variation_loss(s, t, y, 3, size=(3, 4))


def test_token_features_are_read_in_place():
    """Tokens (channels_last maps) take the class-sum path by default on the CPU: no copy of the
    features on the way in (nor of their gradient on the way out): the profiler sees no copy op.
    The centroid op, which copies channels_last, shows one."""
    tokens, _ = _tokens(2, 64, 16, 24, "cpu")
    tokens.requires_grad_()
    y = make_labels(2, 32, 48, 5)

    def copies(fn):  # copies of a tensor as large as the features (small ones: counts to float)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
                and any(shape and math.prod(shape) >= tokens.numel() for shape in e.input_shapes)]

    assert copies(lambda: idd_ops.class_centroids(tokens, y, 5, size=(16, 24))[0].sum().backward()) == []
    fmap = tokens.detach().reshape(2, 16, 24, 64).permute(0, 3, 1, 2)
    assert copies(lambda: ops.class_centroids(fmap, y, 5, 255)) != []  # the test can fail


def test_token_features_reject_bad_input():
    tokens = torch.randn(2, 12, 4)
    y = torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="size=\\(H, W\\)"):
        idd_ops.class_centroids(tokens, y, 3)
    with pytest.raises(ValueError, match="size: 3 x 5 = 15 pixels, but feats has N=12"):
        idd_ops.class_centroids(tokens, y, 3, size=(3, 5))
    with pytest.raises(TypeError, match="size"):
        idd_ops.class_centroids(tokens, y, 3, size=12)
    with pytest.raises(ValueError, match="student_feats: expected a 4-D"):
        idd_ops.inter_class_distance_loss(torch.randn(2, 4), torch.randn(2, 3, 3, 4), y, 3)
