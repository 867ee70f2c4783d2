"""Metrics against loop-based reference implementations and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mumic_batch.core import metrics


def _random_case(seed: int, n: int = 40, c: int = 7, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Labels with an image without positives and a class without positives; scores with many ties."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < 0.3
    y[0, :] = False  # an image with no positive label
    y[:, c - 1] = False  # a class with no positive
    scores = rng.random((n, c))
    return y, np.round(scores, 1) if ties else scores


def _ref_ap(y: list[bool], s: list[float]) -> float:
    """sklearn's step-wise AP: one threshold per distinct score, highest first."""
    n_pos = sum(y)
    if n_pos == 0:
        return math.nan
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        tp = sum(1 for yi, si in zip(y, s) if si >= t and yi)
        fp = sum(1 for yi, si in zip(y, s) if si >= t and not yi)
        recall = tp / n_pos
        total += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return total


def _ref_gap(y: np.ndarray, s: np.ndarray, k: int | None) -> float:
    """YouTube-8M GAP with stable ordering: class index within an image, then (image, rank) in the pool."""
    n, c = y.shape
    k = c if k is None else min(k, c)
    pool = []
    for i in range(n):
        ranked = sorted(range(c), key=lambda j: -s[i, j])  # Python's sort is stable
        for j in ranked[:k]:
            pool.append((float(s[i, j]), bool(y[i, j])))
    pool = sorted(pool, key=lambda item: -item[0])
    hits, total = 0, 0.0
    for position, (_, rel) in enumerate(pool, start=1):
        if rel:
            hits += 1
            total += hits / position
    n_pos = int(y.sum())
    return total / n_pos if n_pos else math.nan


def _ref_precision(y: list[bool], s: list[float], t: float) -> float:
    predicted = [yi for yi, si in zip(y, s) if si >= t]
    return sum(predicted) / len(predicted)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [True, False])
def test_average_precision_matches_reference(seed: int, ties: bool) -> None:
    y, s = _random_case(seed, ties=ties)
    for c in range(y.shape[1] - 1):
        ours = metrics.average_precision(y[:, c], s[:, c])
        assert ours == pytest.approx(_ref_ap(list(y[:, c]), list(s[:, c])), abs=1e-12)


def test_average_precision_without_positives_is_nan() -> None:
    assert math.isnan(metrics.average_precision(np.zeros(5, bool), np.linspace(0, 1, 5)))


def test_average_precision_known_values() -> None:
    assert metrics.average_precision([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(1.0)
    # Ranking pos, neg, pos: AP = 0.5 * 1 + 0.5 * 2/3.
    assert metrics.average_precision([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(0.5 + 1 / 3)
    # A tie between one positive and one negative is a single step at precision 1/2.
    assert metrics.average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_per_class_ap_matches_reference(seed: int) -> None:
    y, s = _random_case(seed)
    aps = metrics.per_class_ap(y, s)
    assert aps.shape == (y.shape[1],)
    assert math.isnan(aps[-1])
    expected = [_ref_ap(list(y[:, c]), list(s[:, c])) for c in range(y.shape[1] - 1)]
    np.testing.assert_allclose(aps[:-1], expected, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3, 7, 50, None])
def test_gap_matches_reference(seed: int, k: int | None) -> None:
    y, s = _random_case(seed)
    assert metrics.gap_at_k(y, s, k) == pytest.approx(_ref_gap(y, s, k), abs=1e-12)


def test_gap_known_value_and_tie_order() -> None:
    y = np.array([[1, 0, 0], [0, 1, 0]], bool)
    s = np.array([[0.9, 0.5, 0.1], [0.5, 0.8, 0.1]])
    # Top-1 pool: (0.9, hit), (0.8, hit) -> AP 1. Top-2 pool adds two misses at 0.5 after both hits.
    assert metrics.gap_at_k(y, s, 1) == pytest.approx(1.0)
    assert metrics.gap_at_k(y, s, 2) == pytest.approx(1.0)
    # Image 0's true class ties with a false one: stable order puts class 0 (true) first.
    tied = np.array([[0.5, 0.5, 0.1]])
    assert metrics.gap_at_k(np.array([[1, 0, 0]], bool), tied, 1) == pytest.approx(1.0)
    assert metrics.gap_at_k(np.array([[0, 1, 0]], bool), tied, 1) == pytest.approx(0.0)
    assert metrics.gap_at_k(np.array([[0, 1, 0]], bool), tied, 2) == pytest.approx(0.5)


def test_gap_counts_positives_outside_top_k() -> None:
    y = np.array([[1, 1, 1, 0]], bool)
    s = np.array([[0.9, 0.8, 0.7, 0.6]])
    assert metrics.gap_at_k(y, s, 1) == pytest.approx(1 / 3)
    assert metrics.gap_at_k(y, s, None) == pytest.approx(1.0)


def test_gap_k_beyond_classes_equals_full_gap() -> None:
    y, s = _random_case(11)
    assert metrics.gap_at_k(y, s, 1000) == metrics.gap_at_k(y, s, None) == metrics.gap_at_k(y, s, y.shape[1])


def test_gap_edge_cases() -> None:
    y, s = _random_case(0)
    assert math.isnan(metrics.gap_at_k(np.zeros_like(y), s, 3))
    with pytest.raises(ValueError):
        metrics.gap_at_k(y, s, 0)
    with pytest.raises(ValueError):
        metrics.gap_at_k(y, s[:, :3], 2)


@pytest.mark.parametrize("seed", range(4))
def test_macro_map_is_mean_over_classes_with_positives(seed: int) -> None:
    y, s = _random_case(seed)
    subset = [0, 2, 6]  # class 6 has no positive and must be skipped
    expected = np.mean([_ref_ap(list(y[:, c]), list(s[:, c])) for c in (0, 2)])
    assert metrics.macro_map(y, s, subset) == pytest.approx(expected, abs=1e-12)
    full = np.mean([_ref_ap(list(y[:, c]), list(s[:, c])) for c in range(6)])
    assert metrics.macro_map(y, s) == pytest.approx(full, abs=1e-12)
    assert math.isnan(metrics.macro_map(y, s, [6]))


def test_majority_classes_orders_by_support_then_index() -> None:
    y = np.zeros((10, 5), bool)
    for c, support in enumerate([3, 7, 3, 0, 7]):
        y[:support, c] = True
    assert metrics.majority_classes(y, 3) == [1, 4, 0]
    assert metrics.majority_classes(y, 10) == [1, 4, 0, 2, 3]


def test_threshold_at_precision_constructed() -> None:
    y = np.array([1, 1, 0, 1, 0, 0], bool)
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # Precision at each threshold: 1, 1, 2/3, 3/4, 3/5, 1/2.
    assert metrics.threshold_at_precision(y, s, 0.75) == pytest.approx(0.6)
    assert metrics.threshold_at_precision(y, s, 1.0) == pytest.approx(0.8)
    assert metrics.threshold_at_precision(y, s, 0.5) == pytest.approx(0.4)
    thr = metrics.threshold_at_precision(y, s, 0.7)
    precision, recall = metrics.precision_recall_at(y[:, None], s[:, None], np.array([thr]))
    assert precision[0] >= 0.7 and recall[0] == pytest.approx(1.0)


def test_threshold_at_precision_is_nan_when_unreachable() -> None:
    y = np.array([0, 1, 1, 0], bool)
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert math.isnan(metrics.threshold_at_precision(y, s, 0.9))  # precisions 0, 1/2, 2/3, 1/2
    assert metrics.threshold_at_precision(y, s, 0.6) == pytest.approx(0.7)
    assert math.isnan(metrics.threshold_at_precision(np.zeros(4, bool), s, 0.9))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_threshold_at_precision_matches_reference(seed: int, target: float) -> None:
    y, s = _random_case(seed, n=30)
    for c in range(y.shape[1] - 1):
        col_y, col_s = list(y[:, c]), list(s[:, c])
        reaching = [t for t in set(col_s) if _ref_precision(col_y, col_s, t) >= target]
        thr = metrics.threshold_at_precision(y[:, c], s[:, c], target)
        if reaching:
            assert thr == min(reaching)
        else:
            assert math.isnan(thr)


@pytest.mark.parametrize("seed", range(3))
def test_precision_recall_at_matches_reference(seed: int) -> None:
    y, s = _random_case(seed)
    thresholds = np.array([0.3, 0.5, 0.7, 0.0, 1.1, 0.5, 0.2])  # 1.1: nothing predicted
    precision, recall = metrics.precision_recall_at(y, s, thresholds)
    for c, t in enumerate(thresholds):
        predicted = [bool(y[i, c]) for i in range(y.shape[0]) if s[i, c] >= t]
        n_pos = int(y[:, c].sum())
        exp_p = sum(predicted) / len(predicted) if predicted else math.nan
        exp_r = sum(predicted) / n_pos if n_pos else math.nan
        np.testing.assert_allclose([precision[c], recall[c]], [exp_p, exp_r], atol=1e-12, equal_nan=True)
    assert math.isnan(precision[4]) and math.isnan(recall[6])


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_pairwise_reference_with_ties(seed: int) -> None:
    y, s = _random_case(seed)
    for c in range(y.shape[1] - 1):
        pos, neg = s[y[:, c], c], s[~y[:, c], c]
        # the probability that a positive outranks a negative, ties counting half
        expected = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert metrics.roc_auc(y[:, c], s[:, c]) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(metrics.roc_auc(y[:, -1], s[:, -1]))  # no positive: undefined
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
def test_precision_recall_curve_is_the_curve_average_precision_sums(seed: int) -> None:
    y, s = _random_case(seed)
    for c in range(y.shape[1] - 1):
        precision, recall, thresholds = metrics.precision_recall_curve(y[:, c], s[:, c])
        assert recall[-1] == pytest.approx(1.0) and np.all(np.diff(recall) >= 0)
        np.testing.assert_array_equal(thresholds, np.unique(s[:, c])[::-1])
        for p, t in zip(precision, thresholds):
            assert p == pytest.approx(_ref_precision(list(y[:, c]), list(s[:, c]), t))
        ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
        assert ap == pytest.approx(_ref_ap(list(y[:, c]), list(s[:, c])), abs=1e-12)
    empty_p, empty_r, empty_t = metrics.precision_recall_curve(y[:, -1], s[:, -1])
    assert empty_p.size == empty_r.size == empty_t.size == 0


def test_summary_reports_gap_gap_at_k_and_map() -> None:
    y, s = _random_case(4)
    out = metrics.summary(y, s, k=3, map_idx=[0, 1])
    assert out == {"gap": metrics.gap_at_k(y, s), "gap_at_3": metrics.gap_at_k(y, s, 3),
                   "map": metrics.macro_map(y, s, [0, 1])}


def test_reliability_and_ece_known_values() -> None:
    # bin 0.2-0.3: probabilities 0.25 x4, one positive (rate 0.25: calibrated); bin 0.9-1.0: 0.95 x2, one positive
    y = np.array([[1, 0], [0, 1], [0, 0], [0, 0]], bool)
    s = np.array([[0.25, 0.95], [0.25, 0.95], [0.25, 0.25], [0.25, 0.25]])
    # the 0.95 pairs: rate 1/2, gap 0.45; the 0.25 pairs: 1 positive of 6 (rate 1/6), gap 1/12
    confidence, accuracy, counts = metrics.reliability(y, s, bins=10)
    assert counts.tolist() == [0, 0, 6, 0, 0, 0, 0, 0, 0, 2]
    assert confidence[2] == pytest.approx(0.25) and accuracy[2] == pytest.approx(1 / 6)
    assert accuracy[9] == pytest.approx(0.5) and math.isnan(confidence[0])
    expected = (6 * abs(1 / 6 - 0.25) + 2 * abs(0.5 - 0.95)) / 8
    assert metrics.expected_calibration_error(y, s, bins=10) == pytest.approx(expected)
    assert metrics.expected_calibration_error(np.array([[1, 0]]), np.array([[1.0, 0.0]])) == pytest.approx(0.0)


def test_retrieval_of_same_label_neighbours() -> None:
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], bool)
    clustered = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]])
    out = metrics.retrieval(y, clustered, ks=(1,))
    assert out == {"retrieval_recall_at_1": 1.0, "retrieval_map": 1.0}
    # swap two images' embeddings across the clusters: each label's images now sit with the other label
    swapped = clustered[[0, 2, 1, 3, 4]]
    out = metrics.retrieval(y, swapped, ks=(1, 4))
    assert out["retrieval_recall_at_1"] == 0.0 and out["retrieval_recall_at_4"] == 1.0
    assert out["retrieval_map"] < 0.6


def test_confused_pairs_count_a_class_firing_on_another_class_images() -> None:
    y = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], bool)
    assigned = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
    # class 1 fires on two images of class 0 (rows 0, 1); class 2 on rows 1 and 3 (class 0) and row 3 (class 1);
    # class 0 on row 2 (class 1)
    assert metrics.confused_pairs(y, assigned) == [(0, 1, 2), (0, 2, 2), (1, 0, 1), (1, 2, 1)]
    assert metrics.confused_pairs(y, assigned, top=1) == [(0, 1, 2)]
    assert metrics.confused_pairs(y, y) == []


def test_paired_bootstrap_interval_brackets_a_real_difference() -> None:
    rng = np.random.default_rng(0)
    y = rng.random((200, 4)) < 0.3
    weak = y + rng.normal(0, 1.0, y.shape)
    strong = y + rng.normal(0, 0.3, y.shape)
    delta, low, high = metrics.paired_bootstrap(y, weak, strong, metrics.gap_at_k, n_boot=100)
    assert delta == pytest.approx(metrics.gap_at_k(y, strong) - metrics.gap_at_k(y, weak))
    assert 0.0 < low <= delta <= high
    same = metrics.paired_bootstrap(y, weak, weak, metrics.gap_at_k, n_boot=20)
    assert same == (0.0, 0.0, 0.0)
