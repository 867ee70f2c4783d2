"""Thresholds chosen on a small validation split, checked on a large sample of the same score distribution."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mumic_batch.core.thresholds import choose_threshold, choose_thresholds, global_threshold
from mumic_batch.model.artifact import save_artifact
from mumic_batch.model.manifest import ClassEntry, read_manifest
from mumic_batch.model.backbone import TINY_ARCH
from mumic_batch.model.mumic import build_mumic


def _scores(rng: np.random.Generator, n: int, prevalence: float, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and sigmoid scores: positives' logits `separation` above the negatives' (unit-variance normals)."""
    y = rng.random(n) < prevalence
    logits = rng.normal(size=n) + separation * y - 2.0
    return y, 1.0 / (1.0 + np.exp(-logits))


def _test_precision(threshold: float, separation: float, prevalence: float) -> float:
    y, s = _scores(np.random.default_rng(99), 200_000, prevalence, separation)
    pred = s >= threshold
    return float((pred & y).sum() / pred.sum())


def test_too_few_positives_get_no_label() -> None:
    y = np.zeros(150, bool)
    y[:3] = True
    s = np.where(y, 0.9, 0.1)
    choice = choose_threshold(y, s, 0.8, min_support=5)
    assert not choice.assign and "3 validation positives" in choice.note
    assert choice.threshold == 1.0 and math.isnan(choice.precision)


def test_a_class_that_cannot_reach_the_target_gets_no_label() -> None:
    rng = np.random.default_rng(0)
    y, s = _scores(rng, 150, 0.15, separation=0.3)  # barely better than chance
    choice = choose_threshold(y, s, 0.8)
    assert not choice.assign and "resamples" in choice.note and choice.reach_rate < 0.5


def test_bootstrapped_thresholds_hold_on_unseen_data() -> None:
    """Over 20 validation draws of 150 images: test precision near the target, inside the promised interval."""
    separation, prevalence, target = 3.0, 0.15, 0.8
    test_precision, covered = [], []
    for seed in range(20):
        y, s = _scores(np.random.default_rng(seed), 150, prevalence, separation)
        choice = choose_threshold(y, s, target, shrinkage=0.0, ci=0.9)
        assert choice.assign
        assert choice.precision_low <= choice.precision <= choice.precision_high
        assert choice.recall_low <= choice.recall <= choice.recall_high
        test_precision.append(_test_precision(choice.threshold, separation, prevalence))
        covered.append(choice.precision_low <= test_precision[-1] <= choice.precision_high)
    deviation = np.abs(np.array(test_precision) - target)
    assert np.mean(deviation <= 0.1) >= 0.75 and np.mean(deviation) < 0.07
    assert np.mean(covered) >= 0.8


def test_shrinkage_moves_towards_the_global_threshold() -> None:
    y, s = _scores(np.random.default_rng(3), 150, 0.2, separation=3.0)
    own = choose_threshold(y, s, 0.8, shrinkage=0.0).threshold
    pulled = choose_threshold(y, s, 0.8, global_t=0.9, shrinkage=10.0).threshold
    full = choose_threshold(y, s, 0.8, global_t=0.9, shrinkage=1e9).threshold
    assert own < pulled < 0.9 and full == pytest.approx(0.9, abs=1e-6)


def test_choose_thresholds_per_class_uses_the_pooled_global_threshold() -> None:
    rng = np.random.default_rng(4)
    cols = [_scores(rng, 150, 0.2, 3.0), _scores(rng, 150, 0.02, 3.0)]
    y, s = np.stack([c[0] for c in cols], 1), np.stack([c[1] for c in cols], 1)
    choices = choose_thresholds(y, s, 0.8, shrinkage=10.0)
    assert choices[0].assign and not choices[1].assign
    assert f"global {global_threshold(y, s, 0.8):.3f}" in choices[0].note


def test_class_entries_keep_their_validation_fields_through_the_manifest(tmp_path) -> None:
    plain = ClassEntry("red", "a photo of something red", 0.4)
    checked = ClassEntry("blue", "a photo of something blue", 0.7, assign=True, note="bootstrap median",
                         target_precision=0.8, support=12, auc=0.93, expected_precision=0.81, precision_low=0.7,
                         precision_high=0.92, expected_recall=0.5, recall_low=0.3, recall_high=0.66)
    dropped = ClassEntry("grey", "a photo of something grey", 1.0, assign=False, note="no label", support=2)
    save_artifact(tmp_path / "m", build_mumic(TINY_ARCH, seed=0), name="m", version="v1",
                  classes=[plain, checked, dropped])
    assert read_manifest(tmp_path / "m").classes == (plain, checked, dropped)
    on_disk = json.loads((tmp_path / "m" / "manifest.json").read_text())["classes"]
    # an entry without validation fields is written exactly as older manifests have it
    assert on_disk[0] == {"name": "red", "prompt": "a photo of something red", "threshold": 0.4, "zero_shot": False}
    assert on_disk[2]["assign"] is False and dropped.effective_threshold == math.inf


def test_a_threshold_shrunk_above_every_positive_gives_no_label() -> None:
    y = np.zeros(40, bool)
    y[:6] = True
    s = np.where(y, 0.3, 0.1)  # separable, but every score is far below the global threshold
    assert choose_threshold(y, s, 0.8, global_t=0.99, shrinkage=0.0).assign
    choice = choose_threshold(y, s, 0.8, global_t=0.99, shrinkage=1e6)
    assert not choice.assign and "above every validation positive" in choice.note
