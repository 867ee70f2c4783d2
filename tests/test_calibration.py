"""Per-class Platt scaling: the fit, the manifest, and one scaling on every path from logits to stored probabilities."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from mumic_batch.config import ClassPromptCfg, TrainCfg
from mumic_batch.core.calibration import apply_platt, fit_platt, fit_platt_class, sigmoid
from mumic_batch.core.thresholds import choose_thresholds
from mumic_batch.model.manifest import ArtifactError, ClassEntry, read_manifest
from mumic_batch.model.backbone import TINY_ARCH
from mumic_batch.model.mumic import build_mumic, tempered_logits
from mumic_batch.model.predictor import Predictor
from mumic_batch.model.train import Classifier, predict_logits
from mumic_batch.pipeline.evaluate import uncalibrated
from mumic_batch.pipeline.train import class_entries, validation_scores
from mumic_batch.spark.rescore import score_batches
from tests.fixtures.models import TINY_CLASSES, random_pixels, write_tiny_artifact

SCALED = tuple(dataclasses.replace(c, platt_a=a, platt_b=b, calibration="test scaling")
               for c, (a, b) in zip(TINY_CLASSES, [(0.5, -1.0), (2.0, 0.5), (1.0, 0.0), (0.8, 0.3), (1.5, -0.2)]))


def _synthetic(rng: np.random.Generator, n: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits spread like a model's and labels drawn from sigmoid(a * logit + b): the true scaling is (a, b)."""
    z = rng.normal(0.0, 4.0, n)
    return rng.random(n) < sigmoid(a * z + b), z


def test_the_fit_recovers_a_known_scaling() -> None:
    rng = np.random.default_rng(0)
    cols = [_synthetic(rng, 20_000, 0.4, -1.5), _synthetic(rng, 20_000, 1.8, 0.7)]
    y, z = np.stack([c[0] for c in cols], 1), np.stack([c[1] for c in cols], 1)
    fits = fit_platt(y, z)
    assert fits[0].fitted and fits[1].fitted
    assert (fits[0].a, fits[0].b) == pytest.approx((0.4, -1.5), abs=0.06)
    assert (fits[1].a, fits[1].b) == pytest.approx((1.8, 0.7), abs=0.12)
    calibrated = apply_platt(z, np.array([f.a for f in fits]), np.array([f.b for f in fits]))
    assert calibrated.shape == z.shape and np.all((calibrated > 0) & (calibrated < 1))


def test_an_already_calibrated_class_stays_near_the_identity() -> None:
    y, z = _synthetic(np.random.default_rng(1), 5_000, 1.0, 0.0)
    fit = fit_platt_class(y, z)
    assert (fit.a, fit.b) == pytest.approx((1.0, 0.0), abs=0.1)


def test_classes_without_support_keep_the_identity_and_say_why() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(200, 3))
    y = np.zeros((200, 3), bool)
    y[:4, 0] = True  # 4 positives
    y[:, 1] = True
    y[:3, 1] = False  # 3 negatives
    y[:, 2] = z[:, 2] < 0  # enough of both, but the logit ranks them backwards
    few_pos, few_neg, reversed_ = fit_platt(y, z, min_support=10)
    assert (few_pos.a, few_pos.b, few_pos.fitted) == (1.0, 0.0, False) and "4 positives" in few_pos.note
    assert not few_neg.fitted and "3 negatives" in few_neg.note
    assert (reversed_.a, reversed_.b, reversed_.fitted) == (1.0, 0.0, False) and "reverses" in reversed_.note


def test_the_fit_stays_finite_on_separable_classes() -> None:
    z = np.linspace(-5, 5, 400)
    fit = fit_platt_class(z > 0, z)
    assert fit.fitted and math.isfinite(fit.a) and math.isfinite(fit.b) and fit.a > 1.0


def test_manifest_round_trip_keeps_the_scaling_and_old_manifests_load_as_identity(tmp_path) -> None:
    manifest = write_tiny_artifact(tmp_path / "scaled", classes=SCALED)
    assert read_manifest(tmp_path / "scaled").classes == manifest.classes == SCALED
    on_disk = json.loads((tmp_path / "scaled" / "manifest.json").read_text())["classes"]
    assert on_disk[0]["platt_a"] == 0.5 and on_disk[0]["platt_b"] == -1.0
    # a manifest written before calibration existed has no platt fields: the identity, written the same way
    write_tiny_artifact(tmp_path / "old")
    old = json.loads((tmp_path / "old" / "manifest.json").read_text())["classes"]
    assert not any("platt_a" in c or "calibration" in c for c in old)
    loaded = read_manifest(tmp_path / "old").classes
    assert all((c.platt_a, c.platt_b, c.calibrated) == (1.0, 0.0, False) for c in loaded)


def test_a_scaling_that_reverses_or_poisons_probabilities_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="platt_a"):
        ClassEntry("red", "a photo of something red", platt_a=0.0)
    with pytest.raises(ValueError, match="platt_b"):
        ClassEntry("red", "a photo of something red", platt_b=math.nan)
    write_tiny_artifact(tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    data = json.loads(path.read_text())
    data["classes"][0]["platt_a"] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="platt_a"):
        read_manifest(tmp_path / "m")


@pytest.fixture(scope="module")
def scaled_and_plain(tmp_path_factory) -> tuple[Predictor, Predictor]:
    """The same tiny weights twice: with SCALED's per-class scaling, and without."""
    root = tmp_path_factory.mktemp("calibration")
    write_tiny_artifact(root / "scaled", classes=SCALED)
    write_tiny_artifact(root / "plain")
    return Predictor.load(str(root / "scaled"), device="cpu"), Predictor.load(str(root / "plain"), device="cpu")


def test_tagging_stores_the_scaled_probabilities(scaled_and_plain) -> None:
    scaled, plain = scaled_and_plain
    probs, emb = scaled.predict(random_pixels(8, seed=5))
    plain_probs, plain_emb = plain.predict(random_pixels(8, seed=5))
    np.testing.assert_array_equal(emb, plain_emb)
    model = scaled.model
    logits = tempered_logits(torch.from_numpy(emb), scaled.class_emb, model.log_scale, model.bias).detach().numpy()
    a, b = np.array([c.platt_a for c in SCALED]), np.array([c.platt_b for c in SCALED])
    np.testing.assert_allclose(probs, apply_platt(logits, a, b), rtol=0, atol=1e-6)
    np.testing.assert_allclose(plain_probs, sigmoid(logits), rtol=0, atol=1e-6)
    assert not np.allclose(probs[:, 0], plain_probs[:, 0], atol=1e-3)  # the scaling changes something
    np.testing.assert_array_equal(probs[:, 2], plain_probs[:, 2])  # the identity class: exactly unchanged
    # The runner's path: uint8 pixels through score_uint8 give the same scaled probabilities.
    nhwc = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    via_runner, runner_emb = scaled.score_uint8(nhwc)
    head = scaled.class_head(scaled.class_names)
    np.testing.assert_allclose(head.probs(runner_emb.numpy()), via_runner.numpy(), rtol=0, atol=1e-6)


def test_add_labels_scores_stored_embeddings_with_the_same_scaling(scaled_and_plain) -> None:
    scaled, plain = scaled_and_plain
    probs, emb = scaled.predict(random_pixels(6, seed=7))
    names = ("red", "blue", "digit_7")
    columns = [scaled.class_names.index(n) for n in names]
    head = scaled.class_head(names)
    np.testing.assert_allclose(head.probs(emb), probs[:, columns], rtol=0, atol=1e-6)
    plain_probs, _ = plain.predict(random_pixels(6, seed=7))
    np.testing.assert_allclose(head.probs(emb, calibrated=False), plain_probs[:, columns], rtol=0, atol=1e-6)
    # rescore's mapInArrow function (what add_labels runs on the workers), called on one Arrow batch
    emb_col = pa.array([list(map(float, e)) for e in emb] + [None], type=pa.list_(pa.float32()))
    batch = pa.RecordBatch.from_arrays([pa.array([f"i{k}" for k in range(7)]), pa.array(["r"] * 7), emb_col],
                                       names=["image_id", "run_id", "embedding"])
    out = next(score_batches(head)(iter([batch])))
    stored = out.column("zero_shot_probs").to_pylist()
    assert stored[-1] is None
    for row, expected in zip(stored[:-1], probs[:, columns]):
        np.testing.assert_allclose([dict(row)[n] for n in names], expected, rtol=0, atol=1e-6)


def test_evaluation_reports_the_uncalibrated_numbers_only_for_a_scaled_model(scaled_and_plain) -> None:
    scaled, plain = scaled_and_plain
    probs, emb = scaled.predict(random_pixels(10, seed=8))
    y = np.random.default_rng(9).random(probs.shape) < 0.3
    numbers = uncalibrated(scaled, y, emb, 2)
    assert set(numbers) == {"gap_uncalibrated", "gap_at_2_uncalibrated", "ece_uncalibrated"}
    from mumic_batch.core import metrics

    plain_probs, _ = plain.predict(random_pixels(10, seed=8))
    assert numbers["ece_uncalibrated"] == pytest.approx(metrics.expected_calibration_error(y, plain_probs), abs=1e-6)
    assert numbers["gap_at_2_uncalibrated"] == pytest.approx(metrics.gap_at_k(y, plain_probs, 2), abs=1e-6)
    assert uncalibrated(plain, y, emb, 2) == {}


def test_thresholds_are_chosen_on_the_calibrated_validation_probabilities() -> None:
    """validation_scores + class_entries as train.py calls them, on a real tiny model's validation logits."""
    clf = Classifier(build_mumic(TINY_ARCH, seed=3, init_bias=0.0), [c.prompt for c in TINY_CLASSES[:2]])
    pixels = torch.from_numpy(random_pixels(300, seed=10))
    logits = predict_logits(clf, pixels, torch.device("cpu"), "fp32").numpy()
    # labels that follow the logits, but far less sharply than the model claims: a clearly miscalibrated model
    z = (logits - logits.mean(0)) / logits.std(0)
    y = np.random.default_rng(11).random(z.shape) < sigmoid(1.5 * z - 1.0)
    tc = TrainCfg(calibration="platt", threshold_bootstrap=20, target_precision=0.6)
    probs, platts = validation_scores(clf, pixels, y, tc, torch.device("cpu"))
    assert all(p.fitted for p in platts)
    a, b = np.array([p.a for p in platts]), np.array([p.b for p in platts])
    np.testing.assert_allclose(probs, apply_platt(logits, a, b), rtol=0, atol=1e-6)
    classes = [ClassPromptCfg(c.name, c.prompt) for c in TINY_CLASSES[:2]]
    entries = class_entries(classes, y, probs, tc, platts=platts)
    expected = choose_thresholds(y, probs, 0.6, min_support=tc.threshold_min_support,
                                 shrinkage=tc.threshold_shrinkage, n_boot=20, ci=tc.threshold_ci, seed=tc.seed)
    raw = choose_thresholds(y, sigmoid(logits), 0.6, min_support=tc.threshold_min_support,
                            shrinkage=tc.threshold_shrinkage, n_boot=20, ci=tc.threshold_ci, seed=tc.seed)
    assert [e.threshold for e in entries] == pytest.approx([t.threshold for t in expected], abs=1e-9)
    assert [e.threshold for e in entries] != pytest.approx([t.threshold for t in raw], abs=1e-3)
    assert [(e.platt_a, e.platt_b) for e in entries] == [(p.a, p.b) for p in platts]
    assert all(e.calibrated and e.calibration.startswith("platt") for e in entries)
    # train.calibration=none: the probabilities as they were, no scaling anywhere
    off = TrainCfg(calibration="none", threshold_bootstrap=20)
    plain, none = validation_scores(clf, pixels, y, off, torch.device("cpu"))
    assert none is None
    np.testing.assert_allclose(plain, sigmoid(logits), rtol=0, atol=1e-6)
    assert not any(e.calibrated for e in class_entries(classes, y, plain, off))
