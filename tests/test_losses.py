"""Losses: tempered sigmoid BCE against a float64 reference, temperature and hardness, masks, baselines."""

from __future__ import annotations

import math

import pytest
import torch

from mumic_batch.model.losses import asymmetric_loss, feature_preservation, focal_loss, tempered_sigmoid_bce


def make_batch(n: int = 32, c: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (cosines in [-0.5, 0.5], 0/1 targets with ~15% positives, 0/1 mask with ~80% annotated)."""
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(n, c, generator=g) - 0.5
    targets = (torch.rand(n, c, generator=g) < 0.15).float()
    mask = (torch.rand(n, c, generator=g) < 0.8).float()
    return cos, targets, mask


def reference_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, gamma: float) -> float:
    """Textbook formula, element by element in Python floats (float64)."""
    total, count = 0.0, 0.0
    for x, t, m in zip(logits.flatten().tolist(), targets.flatten().tolist(),
                       (mask if mask is not None else torch.ones_like(logits)).flatten().tolist()):
        p = 1.0 / (1.0 + math.exp(-x))
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        total += m * bce * (1 - p_t) ** gamma
        count += m
    return total / max(count, 1.0)


def hard_negative_share(cos: torch.Tensor, targets: torch.Tensor, scale: float, bias: float = 0.0,
                        loss=tempered_sigmoid_bce, **kwargs: float) -> float:
    """Share of the gradient (w.r.t. cosines) that falls on hard negatives.

    Hard negatives: the 10% of negative pairs with the highest cosine. Share: sum |grad| over them
    divided by sum |grad| over all negatives.
    """
    cos = cos.clone().requires_grad_(True)
    loss(scale * cos + bias, targets, **kwargs).backward()
    negatives = targets == 0
    neg_cos, neg_grad = cos.detach()[negatives], cos.grad[negatives].abs()
    hard = neg_cos.topk(max(1, neg_cos.numel() // 10)).indices
    return float(neg_grad[hard].sum() / neg_grad.sum())


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_tempered_sigmoid_bce_matches_a_float64_reference(gamma: float, use_mask: bool) -> None:
    cos, targets, mask = make_batch()
    logits = 14.3 * cos - 2.0
    got = tempered_sigmoid_bce(logits, targets, mask if use_mask else None, gamma=gamma)
    expected = reference_bce(logits.double(), targets.double(), mask.double() if use_mask else None, gamma)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_tempered_sigmoid_bce_is_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[200.0, -200.0, 80.0, -80.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss = tempered_sigmoid_bce(logits, targets, gamma=2.0)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 50  # two confidently wrong pairs
    assert bool(torch.isfinite(logits.grad).all())


def test_lower_temperature_raises_the_gradient_share_of_hard_negatives() -> None:
    cos, targets, _ = make_batch(n=64, c=20)
    shares = [hard_negative_share(cos, targets, scale) for scale in (1.0, 3.0, 10.0)]
    assert shares[0] < shares[1] < shares[2], shares
    assert shares[0] == pytest.approx(0.1, abs=0.05)  # near-uniform at temperature 1: ~ their 10% count


def test_gradient_share_saturates_once_hard_negatives_reach_p_near_1() -> None:
    """Documents the limit of the temperature alone: with bias 0, scales far above 10 stop sharpening."""
    cos, targets, _ = make_batch(n=64, c=20)
    at_10, at_100 = hard_negative_share(cos, targets, 10.0), hard_negative_share(cos, targets, 100.0)
    assert at_100 <= at_10 + 0.01
    with_bias = hard_negative_share(cos, targets, 10.0, bias=-5.0)
    assert with_bias > at_10  # a negative bias keeps the negatives off saturation, so hardness shows again


def test_focusing_exponent_raises_the_gradient_share_of_hard_negatives() -> None:
    cos, targets, _ = make_batch(n=64, c=20)
    plain = hard_negative_share(cos, targets, 5.0, gamma=0.0)
    focused = hard_negative_share(cos, targets, 5.0, gamma=2.0)
    assert focused > plain


@pytest.mark.parametrize(
    "loss",
    [
        tempered_sigmoid_bce,
        lambda x, t, m: tempered_sigmoid_bce(x, t, m, gamma=2.0),
        focal_loss,
        asymmetric_loss,
    ],
    ids=["bce", "bce_gamma2", "focal", "asl"],
)
def test_masked_pairs_change_neither_loss_nor_gradient(loss) -> None:
    cos, targets, mask = make_batch()
    logits = (10.0 * cos).requires_grad_(True)
    flipped = torch.where(mask > 0, targets, 1.0 - targets)  # change every unannotated target
    assert not torch.equal(flipped, targets)
    first = loss(logits, targets, mask)
    (grad_first,) = torch.autograd.grad(first, logits)
    second = loss(logits, flipped, mask)
    (grad_second,) = torch.autograd.grad(second, logits)
    assert first.item() == pytest.approx(second.item(), rel=1e-6)
    torch.testing.assert_close(grad_first, grad_second)
    assert bool((grad_first[mask == 0] == 0).all())
    # without the mask the same flip does matter, so the test above can fail
    assert loss(logits, flipped, None).item() != pytest.approx(loss(logits, targets, None).item(), rel=1e-3)


def test_bool_masks_work_and_an_empty_mask_gives_zero() -> None:
    cos, targets, mask = make_batch()
    assert tempered_sigmoid_bce(cos, targets, mask.bool()).item() == pytest.approx(
        tempered_sigmoid_bce(cos, targets, mask).item()
    )
    assert tempered_sigmoid_bce(cos, targets, torch.zeros_like(mask)).item() == 0.0


def test_focal_and_asl_reduce_to_bce_in_their_degenerate_settings() -> None:
    cos, targets, mask = make_batch()
    logits = 14.3 * cos
    bce = tempered_sigmoid_bce(logits, targets, mask)
    torch.testing.assert_close(focal_loss(logits, targets, mask, gamma=0.0, alpha=None), bce)
    torch.testing.assert_close(focal_loss(logits, targets, mask, gamma=0.0, alpha=0.5), 0.5 * bce)
    torch.testing.assert_close(asymmetric_loss(logits, targets, mask, gamma_pos=0.0, gamma_neg=0.0, clip=0.0), bce)
    torch.testing.assert_close(
        focal_loss(logits, targets, mask, gamma=2.0, alpha=None), tempered_sigmoid_bce(logits, targets, mask, 2.0)
    )


def test_asl_discards_easy_negatives_and_down_weights_the_rest() -> None:
    logits = torch.tensor([[-5.0, 0.0, 3.0]])
    negatives = torch.zeros(1, 3)
    per_pair = [asymmetric_loss(logits[:, i : i + 1], negatives[:, i : i + 1]).item() for i in range(3)]
    assert per_pair[0] == 0.0  # p = 0.0067 < clip = 0.05: no loss at all
    bce = [tempered_sigmoid_bce(logits[:, i : i + 1], negatives[:, i : i + 1]).item() for i in range(3)]
    assert per_pair[1] < bce[1] and per_pair[2] < bce[2]


def test_shape_mismatches_are_errors() -> None:
    with pytest.raises(ValueError, match="targets shape"):
        tempered_sigmoid_bce(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask shape"):
        tempered_sigmoid_bce(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2))


def test_feature_preservation_is_the_mean_of_two_minus_two_cosines() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    expected = (2.0 - 2.0 * (a * b).sum(-1)).mean()
    torch.testing.assert_close(feature_preservation(a, b), expected)
    assert feature_preservation(a, a).item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        feature_preservation(a, b[:3])
