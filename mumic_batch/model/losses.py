"""Multi-label losses over image x class logit matrices (logits already include the scale and bias).

All losses return the mean over the (masked) image x class pairs, so that values are comparable
between losses and between batches with different numbers of annotated pairs. `mask` (bool or
0/1 float, same shape as the logits) marks the annotated pairs; pairs with mask 0 contribute
neither loss nor gradient (partial labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_mean(loss: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `loss` over the pairs where mask is set (0 when none is)."""
    if mask is None:
        return loss.mean()
    if mask.shape != loss.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape {tuple(loss.shape)}")
    weights = mask.to(loss.dtype)
    # where(), not multiplication: a masked pair's inf/nan loss must not leak through 0 * inf
    total = torch.where(weights > 0, loss * weights, torch.zeros_like(loss)).sum()
    return total / weights.sum().clamp_min(1.0)


def _check(logits: Tensor, targets: Tensor) -> Tensor:
    """Targets as the logits' dtype, with matching shapes."""
    if logits.shape != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits shape {tuple(logits.shape)}")
    return targets.to(logits.dtype)


def _one_minus_pt(logits: Tensor, targets: Tensor) -> Tensor:
    """1 - p_t, the probability mass on the wrong side, computed stably (sigmoid of +-logits)."""
    return targets * torch.sigmoid(-logits) + (1.0 - targets) * torch.sigmoid(logits)


def tempered_sigmoid_bce(logits: Tensor, targets: Tensor, mask: Tensor | None = None, gamma: float = 0.0) -> Tensor:
    """MuMIC's hardness-aware tempered sigmoid BCE: mean BCE-with-logits, optionally weighted by (1 - p_t)^gamma.

    The temperature lives in the logits (exp(log_scale) * cos + bias): a larger scale concentrates the
    gradient on hard pairs. gamma > 0 adds an explicit focusing exponent on top (gamma = 0: plain BCE).
    """
    targets = _check(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma:
        loss = loss * _one_minus_pt(logits, targets).pow(gamma)
    return _masked_mean(loss, mask)


def focal_loss(
    logits: Tensor, targets: Tensor, mask: Tensor | None = None, gamma: float = 2.0, alpha: float | None = 0.25
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017): alpha_t (1 - p_t)^gamma BCE; alpha=None disables class weighting."""
    targets = _check(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma:
        loss = loss * _one_minus_pt(logits, targets).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return _masked_mean(loss, mask)


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
) -> Tensor:
    """Asymmetric loss (ASL, Ridnik et al. 2021): separate focusing for positives and negatives, plus a
    probability margin `clip` that shifts negatives (p_m = max(p - clip, 0)) and discards easy ones.

    gamma_pos = gamma_neg = clip = 0 gives plain BCE.
    """
    targets = _check(logits, targets)
    prob = torch.sigmoid(logits)
    log_pos = F.logsigmoid(logits)
    if clip > 0:
        # 1 - p_m = min(1 - p + clip, 1) >= clip, so the log is finite
        log_neg = torch.log((torch.sigmoid(-logits) + clip).clamp(max=1.0))
        prob_neg = (prob - clip).clamp(min=0.0)
    else:
        log_neg = F.logsigmoid(-logits)
        prob_neg = prob
    loss_pos = targets * log_pos * (1.0 - prob).pow(gamma_pos)
    loss_neg = (1.0 - targets) * log_neg * prob_neg.pow(gamma_neg)
    return _masked_mean(-(loss_pos + loss_neg), mask)


def feature_preservation(embeddings: Tensor, base_embeddings: Tensor) -> Tensor:
    """Mean squared distance between unit-norm embeddings and the base model's (2 - 2 cos per image).

    A penalty that keeps the fine-tuned image tower where the base put the images, so that prompts the
    fine-tuning never saw (zero-shot classes) still point at the right images.
    """
    if embeddings.shape != base_embeddings.shape:
        raise ValueError(f"embedding shapes differ: {tuple(embeddings.shape)} != {tuple(base_embeddings.shape)}")
    return (embeddings.float() - base_embeddings.float()).pow(2).sum(dim=-1).mean()
