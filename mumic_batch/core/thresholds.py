"""Per-class decision thresholds that hold on unseen data, with the precision and recall they promise.

The plain rule (the lowest validation score whose precision reaches the target) overfits a small
validation split: on 150 images a weak class can reach 0.8 precision on three lucky positives and then
be assigned to most of the catalogue. What is done instead, per class:

- **support**: fewer than `min_support` validation positives and the class gets no label (fallback);
- **bootstrap**: the rule is applied to `n_boot` resamples of the validation rows; a class whose target is
  reached in less than half of them cannot reach it (fallback: no label), otherwise its threshold is the
  median of the resampled thresholds (a bagged estimate, far less noisy than one split's);
- **shrinkage**: that threshold moves towards the global one (the rule over all classes' pairs pooled), in
  logit space, with weight support / (support + shrinkage): few positives, more of the global threshold;
- **expected precision/recall**: their median and `ci` interval over the resamples, at the final threshold
  (a class whose final threshold is above every validation positive gets no label: it promises nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mumic_batch.core.metrics import threshold_at_precision

_EPS = 1e-6


@dataclass(frozen=True)
class ThresholdChoice:
    """One class's decision rule and what validation promises for it."""

    threshold: float  # probability at or above which the class is assigned
    assign: bool  # False: the class is never assigned (the fallback), see `note`
    note: str  # how the threshold was chosen, or why the class gets no label
    support: int  # validation positives
    reach_rate: float  # share of bootstrap resamples in which the target precision was reached
    precision: float  # expected precision at the threshold (bootstrap median; NaN when nothing is predicted)
    precision_low: float  # lower end of the bootstrap interval
    precision_high: float  # upper end
    recall: float  # expected recall at the threshold (bootstrap median)
    recall_low: float
    recall_high: float


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _precision_recall(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = s >= threshold
    tp, n_pred, n_pos = int((pred & y).sum()), int(pred.sum()), int(y.sum())
    return (tp / n_pred if n_pred else math.nan), (tp / n_pos if n_pos else math.nan)


def _interval(values: list[float], ci: float) -> tuple[float, float, float]:
    finite = np.array([v for v in values if not math.isnan(v)])
    if not finite.size:
        return math.nan, math.nan, math.nan
    tail = (1.0 - ci) / 2.0
    low, mid, high = np.quantile(finite, [tail, 0.5, 1.0 - tail])
    return float(mid), float(low), float(high)


def global_threshold(y_true: np.ndarray, scores: np.ndarray, target_precision: float) -> float:
    """The target-precision rule over every (image, class) pair pooled; NaN when no pair reaches it."""
    return threshold_at_precision(np.ravel(y_true), np.ravel(scores), target_precision)


def choose_threshold(y_true_col: np.ndarray, scores_col: np.ndarray, target_precision: float, *,
                     global_t: float = math.nan, min_support: int = 5, shrinkage: float = 10.0,
                     n_boot: int = 200, ci: float = 0.9, seed: int = 0) -> ThresholdChoice:
    """One class's threshold, fallback decision and expected precision/recall (see the module docstring)."""
    y, s = np.asarray(y_true_col).astype(bool).ravel(), np.asarray(scores_col, dtype=np.float64).ravel()
    support = int(y.sum())
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, y.size, y.size) for _ in range(n_boot)] if y.size else []
    boot = [threshold_at_precision(y[i], s[i], target_precision) for i in samples]
    reached = [t for t in boot if not math.isnan(t)]
    reach_rate = len(reached) / len(boot) if boot else 0.0
    if support < min_support or reach_rate < 0.5:
        note = (f"no label: {support} validation positives < {min_support}" if support < min_support else
                f"no label: precision {target_precision} reached in {reach_rate:.0%} of resamples")
        return ThresholdChoice(1.0, False, note, support, reach_rate, *([math.nan] * 6))
    own = float(np.median(reached))
    threshold, note = own, f"bootstrap median of {len(reached)} resamples"
    if shrinkage > 0 and not math.isnan(global_t):
        weight = support / (support + shrinkage)
        threshold = _sigmoid(weight * _logit(own) + (1.0 - weight) * _logit(global_t))
        note += f", shrunk {1.0 - weight:.2f} towards the global {global_t:.3f}"
    if not (s[y] >= threshold).any():
        return ThresholdChoice(1.0, False, f"no label: {note} puts the threshold {threshold:.3f} above every "
                               "validation positive", support, reach_rate, *([math.nan] * 6))
    pairs = [_precision_recall(y[i], s[i], threshold) for i in samples]
    precision = _interval([p for p, _ in pairs], ci)
    recall = _interval([r for _, r in pairs], ci)
    return ThresholdChoice(threshold, True, note, support, reach_rate, *precision, *recall)


def choose_thresholds(y_true: np.ndarray, scores: np.ndarray, target_precision: float, *, min_support: int = 5,
                      shrinkage: float = 10.0, n_boot: int = 200, ci: float = 0.9,
                      seed: int = 0) -> list[ThresholdChoice]:
    """choose_threshold for every class, shrinking towards the global threshold of these scores."""
    y, s = np.asarray(y_true).astype(bool), np.asarray(scores, dtype=np.float64)
    global_t = global_threshold(y, s, target_precision)
    return [choose_threshold(y[:, c], s[:, c], target_precision, global_t=global_t, min_support=min_support,
                             shrinkage=shrinkage, n_boot=n_boot, ci=ci, seed=seed + c) for c in range(y.shape[1])]
