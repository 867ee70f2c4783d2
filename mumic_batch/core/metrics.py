"""Multi-label ranking metrics (pure numpy): per-class AP, GAP@k, macro mAP, thresholds.

Conventions, shared by every function here and by the brute-force references in the tests:
- `y_true` is an N x C array of booleans (or 0/1), `scores` an N x C array of floats.
- A quantity with no defined value returns NaN: the AP of a class with no positive, GAP over data
  with no positive label, precision when nothing is predicted, recall when nothing is positive.
  Means (macro mAP) skip NaN entries.
- Average precision handles tied scores exactly as scikit-learn's `average_precision_score`:
  all items sharing a score form one threshold step.
- GAP@k ranks with stable sorts: within an image, equal scores keep class-index order; in the
  pooled list, equal scores keep (image index, rank within the image) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_matrix(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"y_true and scores must be N x C arrays of one shape, got {y.shape} and {s.shape}")
    return y, s


def _as_column(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores must have the same length, got {y.size} and {s.size}")
    return y, s


def _threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) and the true/false positive counts of `score >= threshold`."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # The last position of each run of equal scores: ties enter together, as one threshold.
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[ends]
    return s_sorted[ends], tps, (ends + 1) - tps


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class, equal to sklearn's average_precision_score; NaN when there is no positive."""
    y, s = _as_column(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    _, tps, fps = _threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall_step = np.diff(np.r_[0, tps]) / n_pos
    return float(np.sum(recall_step * precision))


def per_class_ap(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AP of every class (length C); NaN for classes without positives."""
    y, s = _as_matrix(y_true, scores)
    return np.array([average_precision(y[:, c], s[:, c]) for c in range(y.shape[1])], dtype=np.float64)


def gap_at_k(y_true: np.ndarray, scores: np.ndarray, k: int | None = None) -> float:
    """YouTube-8M global average precision over each image's top-k predictions (k=None: all classes)."""
    y, s = _as_matrix(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    n_classes = y.shape[1]
    k = n_classes if k is None else k
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = np.argsort(-s, axis=1, kind="stable")[:, : min(k, n_classes)]
    pooled_s = np.take_along_axis(s, top, axis=1).ravel()  # row-major: image order, then rank
    pooled_y = np.take_along_axis(y, top, axis=1).ravel()
    rel = pooled_y[np.argsort(-pooled_s, kind="stable")]
    precision_at = np.cumsum(rel) / np.arange(1, rel.size + 1)
    # Dividing by all positives, not only those retrieved, is what penalises a small k.
    return float(np.sum(precision_at[rel]) / n_pos)


def macro_map(y_true: np.ndarray, scores: np.ndarray, class_idx: Sequence[int] | None = None) -> float:
    """Mean per-class AP over `class_idx` (default: all classes), skipping classes with no positive."""
    y, s = _as_matrix(y_true, scores)
    idx = list(range(y.shape[1])) if class_idx is None else [int(c) for c in class_idx]
    aps = per_class_ap(y[:, idx], s[:, idx]) if idx else np.array([])
    aps = aps[~np.isnan(aps)]
    return float(aps.mean()) if aps.size else float("nan")


def majority_classes(y_true: np.ndarray, n: int) -> list[int]:
    """Indices of the n classes with the most positives; ties go to the lower index."""
    support = np.asarray(y_true).astype(bool).sum(axis=0)
    order = np.lexsort((np.arange(support.size), -support))
    return [int(c) for c in order[: max(n, 0)]]


def threshold_at_precision(y_true_col: np.ndarray, scores_col: np.ndarray, target_precision: float) -> float:
    """Lowest score threshold whose precision (score >= threshold) reaches the target.

    When no threshold reaches it, falls back to the threshold that maximises F1 (the highest such
    threshold on ties); NaN when the column has no positive, as no threshold is meaningful then.
    """
    y, s = _as_column(y_true_col, scores_col)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    thresholds, tps, fps = _threshold_counts(y, s)
    precision = tps / (tps + fps)
    reached = np.flatnonzero(precision >= target_precision)
    if reached.size:
        return float(thresholds[reached[-1]])  # thresholds descend: the last one is the lowest
    f1 = 2.0 * tps / (tps + fps + n_pos)
    return float(thresholds[int(np.argmax(f1))])  # argmax takes the first maximum: the highest threshold


def precision_recall_at(
    y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall of `score >= threshold`; NaN where the ratio is 0/0."""
    y, s = _as_matrix(y_true, scores)
    thr = np.asarray(thresholds, dtype=np.float64).ravel()
    if thr.size != y.shape[1]:
        raise ValueError(f"need one threshold per class ({y.shape[1]}), got {thr.size}")
    pred = s >= thr[None, :]
    tp = (pred & y).sum(axis=0).astype(np.float64)
    n_pred, n_pos = pred.sum(axis=0), y.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_pred > 0, tp / n_pred, np.nan)
        recall = np.where(n_pos > 0, tp / n_pos, np.nan)
    return precision, recall


def precision_recall_curve(y_true_col: np.ndarray, scores_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score (highest first), the steps average_precision sums over."""
    y, s = _as_column(y_true_col, scores_col)
    n_pos = int(y.sum())
    if n_pos == 0 or y.size == 0:
        return np.array([]), np.array([])
    _, tps, fps = _threshold_counts(y, s)
    return tps / (tps + fps), tps / n_pos


def roc_auc(y_true_col: np.ndarray, scores_col: np.ndarray) -> float:
    """Area under the ROC curve (ties count half), NaN unless both classes occur; 0.5 is chance."""
    y, s = _as_column(y_true_col, scores_col)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U from average ranks: exact for ties.
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of the 1-based ranks a+1 .. b
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def class_thresholds(y_true: np.ndarray, scores: np.ndarray, target_precision: float,
                     fallback: float = 0.5) -> np.ndarray:
    """threshold_at_precision for every class; `fallback` where a class has no positive to set it on."""
    y, s = _as_matrix(y_true, scores)
    thresholds = np.array([threshold_at_precision(y[:, c], s[:, c], target_precision) for c in range(y.shape[1])])
    return np.where(np.isnan(thresholds), fallback, thresholds)


def summary(y_true: np.ndarray, scores: np.ndarray, k: int = 10, map_idx: Sequence[int] | None = None) -> dict[str, float]:
    """The headline numbers: GAP (all classes), GAP@k and macro mAP over `map_idx` (default all classes)."""
    return {"gap": gap_at_k(y_true, scores), f"gap_at_{k}": gap_at_k(y_true, scores, k),
            "map": macro_map(y_true, scores, map_idx)}
