"""Multi-label ranking metrics: per-class AP, ROC AUC and PR curves (scikit-learn), GAP@k, macro mAP, thresholds.

GAP@k is written here (scikit-learn has no YouTube-8M GAP); AP, ROC AUC and the PR curve are scikit-learn's.

Conventions, shared by every function here and by the brute-force references in the tests:
- `y_true` is an N x C array of booleans (or 0/1), `scores` an N x C array of floats.
- A quantity with no defined value returns NaN: the AP of a class with no positive, GAP over data
  with no positive label, precision when nothing is predicted, recall when nothing is positive.
  Means (macro mAP) skip NaN entries.
- Tied scores form one threshold step (as in scikit-learn), in AP and in the thresholds chosen here.
- GAP@k ranks with stable sorts: within an image, equal scores keep class-index order; in the
  pooled list, equal scores keep (image index, rank within the image) order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn import metrics as skm


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
    """AP of one class (scikit-learn's average_precision_score); NaN when there is no positive."""
    y, s = _as_column(y_true, scores)
    if not y.any():
        return float("nan")
    return float(skm.average_precision_score(y, s))


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
    """Lowest score threshold whose precision (score >= threshold) reaches the target; NaN when none does.

    NaN as well when the column has no positive: no threshold is meaningful then. What to do with such a
    class (no label) is core.thresholds' decision.
    """
    y, s = _as_column(y_true_col, scores_col)
    if not y.any():
        return float("nan")
    thresholds, tps, fps = _threshold_counts(y, s)
    reached = np.flatnonzero(tps / (tps + fps) >= target_precision)
    # thresholds descend: the last one reached is the lowest
    return float(thresholds[reached[-1]]) if reached.size else float("nan")


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


def precision_recall_curve(y_true_col: np.ndarray,
                           scores_col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at every distinct score, highest score first (the steps AP sums over)."""
    y, s = _as_column(y_true_col, scores_col)
    if not y.any():
        return np.array([]), np.array([]), np.array([])
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    # scikit-learn orders by increasing threshold and appends the (precision 1, recall 0) end point
    return precision[:-1][::-1], recall[:-1][::-1], thresholds[::-1]


def roc_auc(y_true_col: np.ndarray, scores_col: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's; ties count half), NaN unless both classes occur; 0.5 is chance."""
    y, s = _as_column(y_true_col, scores_col)
    if y.all() or not y.any():
        return float("nan")
    return float(skm.roc_auc_score(y, s))


def summary(y_true: np.ndarray, scores: np.ndarray, k: int = 10, map_idx: Sequence[int] | None = None) -> dict[str, float]:
    """The headline numbers: GAP (all classes), GAP@k and macro mAP over `map_idx` (default all classes)."""
    return {"gap": gap_at_k(y_true, scores), f"gap_at_{k}": gap_at_k(y_true, scores, k),
            "map": macro_map(y_true, scores, map_idx)}


def reliability(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width probability bin over every (image, class) pair: mean probability, positive rate, pairs.

    Empty bins hold NaN means and count 0. The last bin includes probability 1.
    """
    y, s = _as_matrix(y_true, scores)
    y, s = y.ravel(), s.ravel()
    index = np.minimum((s * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        confidence = np.bincount(index, weights=s, minlength=bins) / counts
        accuracy = np.bincount(index, weights=y.astype(np.float64), minlength=bins) / counts
    return confidence, accuracy, counts


def expected_calibration_error(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """ECE over every (image, class) pair: the pair-weighted mean |positive rate - mean probability| per bin."""
    confidence, accuracy, counts = reliability(y_true, scores, bins)
    if counts.sum() == 0:
        return float("nan")
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(accuracy[filled] - confidence[filled])) / counts.sum())


def retrieval(y_true: np.ndarray, embeddings: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """How well embedding neighbours share labels: recall@k and mean average precision of the neighbours.

    Every image with a label queries all the others by cosine similarity; a neighbour is relevant when it
    shares at least one label with the query. recall@k is the share of queries with a relevant neighbour
    among their k nearest; map is the mean over queries of the AP of the ranked neighbours.
    """
    y = np.asarray(y_true).astype(bool)
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    relevant = (y.astype(np.int64) @ y.T.astype(np.int64)) > 0
    similarity = e @ e.T
    hits = {k: [] for k in ks}
    aps = []
    for i in np.flatnonzero(y.any(axis=1)):
        others = np.r_[0:i, i + 1:y.shape[0]]
        rel = relevant[i, others]
        if not rel.any():
            continue
        order = np.argsort(-similarity[i, others], kind="stable")
        for k in ks:
            hits[k].append(bool(rel[order[:k]].any()))
        aps.append(average_precision(rel, similarity[i, others]))
    out = {f"retrieval_recall_at_{k}": float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    out["retrieval_map"] = float(np.mean(aps)) if aps else float("nan")
    return out


def confused_pairs(y_true: np.ndarray, assigned: np.ndarray, top: int = 10) -> list[tuple[int, int, int]]:
    """The most frequent (true class i, wrongly assigned class j, images) triples, most images first.

    An image counts for (i, j) when it is labelled i, not labelled j, and assigned j: class j fires on
    class i's images. Ties go to the lower (i, j).
    """
    y = np.asarray(y_true).astype(bool)
    wrong = np.asarray(assigned).astype(bool) & ~y
    counts = y.T.astype(np.int64) @ wrong.astype(np.int64)
    np.fill_diagonal(counts, 0)
    order = np.lexsort((np.arange(counts.size), -counts.ravel()))[:top]
    return [(int(k // counts.shape[1]), int(k % counts.shape[1]), int(counts.flat[k])) for k in order
            if counts.flat[k] > 0]


def paired_bootstrap(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                     metric: Callable[[np.ndarray, np.ndarray], float], n_boot: int = 200, ci: float = 0.9,
                     seed: int = 0) -> tuple[float, float, float]:
    """metric(b) - metric(a) on the same images, and its bootstrap interval (images resampled jointly)."""
    y, a, b = np.asarray(y_true), np.asarray(scores_a), np.asarray(scores_b)
    delta = metric(y, b) - metric(y, a)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        samples.append(metric(y[i], b[i]) - metric(y[i], a[i]))
    finite = np.array([v for v in samples if not np.isnan(v)])
    if not finite.size:
        return float(delta), float("nan"), float("nan")
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(delta), float(low), float(high)
