"""Pretrain, train and evaluate jobs end to end on real local Spark and Delta tables."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import evaluate as evaluate_job
from jobs import pretrain as pretrain_job
from jobs import train as train_job
from mumic_batch.config import DecodeCfg, FetchCfg, SampleCfg
from mumic_batch.core import metrics
from mumic_batch.core.sample import CLASSES, HOLDOUTS, fine_tune_classes
from mumic_batch.core.thresholds import choose_thresholds
from mumic_batch.model.manifest import ArtifactError, ClassEntry, read_manifest
from mumic_batch.model.images import load_pixels
from mumic_batch.model.predictor import Predictor
from mumic_batch.pipeline import sample as sample_pipeline
from mumic_batch.pipeline.evaluate import evaluate_scores
from tests.fixtures.models import copy_artifact
from tests.fixtures.tagging import run_tag_job, tag_args

pytestmark = pytest.mark.spark

SAMPLE_SEED, TRAIN_SEED = 7, 11


@pytest.fixture(scope="module")
def workspace(spark, tmp_path_factory) -> Path:
    """A 120-image sample catalogue written as Delta tables by the make_sample pipeline."""
    root = tmp_path_factory.mktemp("learning_jobs")
    sample_pipeline.run(spark, SampleCfg(out_dir=str(root / "sample"), n_images=120, seed=SAMPLE_SEED,
                                          width=320, height=240))
    return root


def _args(root: Path) -> list[str]:
    zero_shot = [{"name": c.name, "prompt": c.prompt, "threshold": 0.5} for c in CLASSES if c.name in HOLDOUTS]
    settings = {
        "tables.catalogue": root / "sample" / "catalogue", "tables.labels": root / "sample" / "labels",
        "tables.runs": root / "runs", "tables.metrics": root / "metrics",
        "fetch.allowed_schemes": "[file]", "fetch.local_roots": f"[{root / 'sample' / 'images'}]",
        "pretrain.out": root / "base", "pretrain.steps": 20, "pretrain.batch_size": 32, "pretrain.eval_every": 10,
        "train.base": root / "base", "train.epochs": 3, "train.checkpoint_every": 1, "train.seed": TRAIN_SEED,
        "train.version": "t1", "train.wise_alpha": 0.5, "model.artifact": root / "tuned", "model.zero_shot": json.dumps(zero_shot),
        "evaluate.report_dir": root / "reports", "infer.device": "cpu", "pretrain.device": "cpu",
        "train.device": "cpu",
    }
    return [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def jobs_ran(workspace: Path, spark) -> dict:
    """Run pretrain, train and evaluate once for the module (capsys is function-scoped, so capture by hand)."""
    results = {}
    for name, main in (("pretrain", pretrain_job.main), ("train", train_job.main), ("evaluate", evaluate_job.main)):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(_args(workspace))
        summary = json.loads(buffer.getvalue().strip().splitlines()[-1])
        assert code == 0, (name, summary)
        results[name] = summary
    return results


def test_trained_artifact_manifest_carries_classes_thresholds_metrics_and_data(workspace, jobs_ran, spark) -> None:
    manifest = read_manifest(workspace / "tuned")
    assert (manifest.name, manifest.version) == ("mumic-demo", "t1")
    expected = [(c.name, c.prompt) for c in fine_tune_classes()]
    assert [(c.name, c.prompt) for c in manifest.classes] == expected
    assert not any(c.zero_shot for c in manifest.classes)
    data = manifest.training_data
    assert data["table"] == str(workspace / "sample" / "labels") and data["format"] == "delta"
    assert data["delta_version"] == 0 and data["split"] == "train" and data["val_split"] == "val"
    assert data["seed"] == TRAIN_SEED and data["rows"] == jobs_ran["train"]["train_rows"] == 84
    assert data["base"]["artifact"] == str(workspace / "base")
    # train.calibration=platt by default, but 18 validation images cannot give a class 10 positives and
    # 10 negatives: every class keeps the identity and says so
    assert set(manifest.metrics["val"]) == {"gap", "gap_at_10", "map", "assigned_classes", "ece", "ece_uncalibrated",
                                            "gap_uncalibrated", "calibrated_classes"}
    assert manifest.metrics["val"]["calibrated_classes"] == 0
    assert all(not c.calibrated and "fewer than 10" in c.calibration for c in manifest.classes)
    assert 0.0 < manifest.metrics["val"]["gap"] <= 1.0 and manifest.metrics["epochs_run"] == 3
    assert manifest.metrics["wise_alpha"] == 0.5
    # The thresholds are chosen (core.thresholds) on the validation scores of the saved (here
    # WiSE-FT-interpolated) weights: recompute them from the artifact.
    labels = spark.read.format("delta").load(str(workspace / "sample" / "labels")).where("split = 'val'")
    labels = labels.orderBy("image_id").toPandas()  # the job's row order: the bootstrap resamples by row
    predictor = Predictor.load(str(workspace / "tuned"), device="cpu")
    loaded = load_pixels(list(labels["uri"]), predictor.spec, FetchCfg(allowed_schemes=("file",)), DecodeCfg())
    probs, _ = predictor.predict(loaded.pixels)
    y = np.array([[name in row for name, _ in expected] for row in labels["labels"]])
    recomputed = choose_thresholds(y, probs, 0.8, seed=TRAIN_SEED)
    np.testing.assert_allclose([c.threshold for c in manifest.classes], [t.threshold for t in recomputed], atol=1e-4)
    assert [c.assign for c in manifest.classes] == [t.assign for t in recomputed]
    assert manifest.metrics["val"]["assigned_classes"] == sum(t.assign for t in recomputed)
    for c, t in zip(manifest.classes, recomputed):
        assert c.support == t.support == int(y[:, [n for n, _ in expected].index(c.name)].sum())
        assert c.target_precision == 0.8 and c.note == t.note
        if c.assign:
            assert c.precision_low <= c.expected_precision <= c.precision_high
    # Zero-shot classes labelled in validation: the threshold and AUC their prompts earn on this model.
    holdout_y = np.array([[name in row for name in sorted(HOLDOUTS)] for row in labels["labels"]])
    zero_shot = manifest.metrics["zero_shot"]
    assert set(zero_shot) == {n for j, n in enumerate(sorted(HOLDOUTS)) if holdout_y[:, j].any()}
    for name, entry in zero_shot.items():
        assert entry["zero_shot"] and entry["target_precision"] == 0.8
        assert entry["support"] == int(holdout_y[:, sorted(HOLDOUTS).index(name)].sum())


def test_base_artifact_marks_its_prompt_classes_zero_shot(workspace, jobs_ran) -> None:
    manifest = read_manifest(workspace / "base")
    assert manifest.training_data["kind"] == "contrastive_pretraining"
    assert manifest.training_data["caption_column"] == "caption" and manifest.training_data["rows"] == 84
    assert all(c.zero_shot for c in manifest.classes) and len(manifest.classes) == len(fine_tune_classes())


def test_runs_table_records_each_learning_job(workspace, jobs_ran, spark) -> None:
    runs = {r["job"]: r for r in spark.read.format("delta").load(str(workspace / "runs")).collect()}
    assert {"pretrain", "train", "evaluate"} <= set(runs)
    for job in ("pretrain", "train", "evaluate"):
        assert runs[job]["outcome"] == "succeeded" and runs[job]["source_version"] == 0
    assert runs["train"]["model_version"] == "t1" and runs["evaluate"]["status_counts"] == {"ok": 18}


def test_evaluate_writes_metrics_table_and_report(workspace, jobs_ran, spark) -> None:
    summary = jobs_ran["evaluate"]
    rows = spark.read.format("delta").load(str(workspace / "metrics")).collect()
    assert {r["model_version"] for r in rows} == {"t1"} and {r["split"] for r in rows} == {"test"}
    overall = {r["metric"]: r["value"] for r in rows if r["class"] is None}
    assert {"gap", "gap_at_10", "map", "map_all", "zero_shot_map", "zero_shot_auc", "images"} <= set(overall)
    assert overall["images"] == 18 and overall["gap"] == pytest.approx(summary["overall"]["gap"])
    per_class = {(r["class"], r["metric"]): r for r in rows if r["class"] is not None}
    for name in HOLDOUTS:
        assert per_class[(name, "ap")]["zero_shot"] is True
    assert per_class[("digit_1", "ap")]["zero_shot"] is False
    entry = next(c for c in read_manifest(workspace / "tuned").classes if c.name == "digit_1")
    assert summary["classes"]["digit_1"]["promised_precision"] == [entry.precision_low, entry.precision_high]
    assert {m for (_, m) in per_class} == {"ap", "auc", "support", "prevalence", "threshold", "precision", "recall",
                                           "assigned_rate", "assign", "target_precision"}
    assert {"ece", "retrieval_recall_at_1", "retrieval_recall_at_5", "retrieval_map", "assigned_classes",
            "worse_than_chance", "threshold_misses_target", "over_assigned"} <= set(overall)
    report = Path(summary["report"])
    assert report.name == "report.md" and report.parent.name == "t1-test"
    text = report.read_text()
    assert "pr_curves.png" in text and "ap_per_class.png" in text and "purple" in text and "## Flags" in text
    assert "## Most confused class pairs" in text and "## Training curves" in text
    for png in ("pr_curves.png", "ap_per_class.png", "reliability.png", "training_curves.png"):
        with Image.open(report.parent / png) as image:
            assert image.format == "PNG" and image.width > 300


def test_evaluate_compares_with_a_previous_version_on_the_same_images(workspace, jobs_ran, spark) -> None:
    args = _args(workspace) + ["--set", f"evaluate.previous={workspace / 'base'}",
                               "--set", f"evaluate.report_dir={workspace / 'reports-vs-base'}"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert evaluate_job.main(args) == 0
    overall = json.loads(buffer.getvalue().strip().splitlines()[-1])["overall"]
    base = jobs_ran["evaluate"]["overall"]
    # a comparison adds numbers; it changes none of this model's own
    assert overall["gap"] == pytest.approx(base["gap"])
    for name in ("gap", "gap_at_10", "map"):
        low, delta, high = (overall[f"vs_previous_{name}{end}"] for end in ("_low", "", "_high"))
        assert low <= delta <= high
    text = (workspace / "reports-vs-base" / "t1-test" / "report.md").read_text()
    assert "## Compared with mumic-base base-v1" in text and "Per-class AP, largest losses first" in text


def test_evaluate_scores_keeps_zero_shot_extras_out_of_the_headline_numbers() -> None:
    rng = np.random.default_rng(0)
    y = rng.random((40, 4)) < 0.3
    scores = np.where(y, 0.6, 0.4) + rng.normal(0, 0.15, y.shape)
    classes = [ClassEntry("a", "pa"), ClassEntry("b", "pb"), ClassEntry("c", "pc"), ClassEntry("z", "pz", zero_shot=True)]
    overall, per_class = evaluate_scores(y, scores, classes, n_own=3, k=2, map_classes=(), majority=2)
    assert overall["gap"] == pytest.approx(metrics.gap_at_k(y[:, :3], scores[:, :3]))
    assert overall["gap_at_2"] == pytest.approx(metrics.gap_at_k(y[:, :3], scores[:, :3], 2))
    subset = metrics.majority_classes(y[:, :3], 2)
    assert overall["map"] == pytest.approx(metrics.macro_map(y[:, :3], scores[:, :3], subset))
    assert overall["zero_shot_map"] == pytest.approx(metrics.average_precision(y[:, 3], scores[:, 3]))
    assert [r.name for r in per_class] == ["a", "b", "c", "z"] and per_class[3].zero_shot
    assert per_class[0].support == int(y[:, 0].sum()) and not math.isnan(per_class[0].auc)


def _run(main, args: list[str]) -> dict:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(args)
    summary = json.loads(buffer.getvalue().strip().splitlines()[-1])
    assert code == 0, summary
    return summary


def test_platt_calibration_through_train_and_evaluate(workspace, jobs_ran, spark) -> None:
    """train.calibration=platt on t1's weights (its finished checkpoint: calibration is not in the fingerprint)."""
    out = workspace / "tuned-platt"
    args = _args(workspace) + [
        "--set", f"model.artifact={out}", "--set", "train.version=t1-platt", "--set", "train.calibration=platt",
        "--set", "train.calibration_min_support=3", "--set", f"train.checkpoint_dir={workspace / 'tuned.ckpt'}",
        "--set", f"tables.runs={workspace / 'runs-platt'}", "--set", f"tables.metrics={workspace / 'metrics-platt'}",
        "--set", f"evaluate.report_dir={workspace / 'reports-platt'}"]
    _run(train_job.main, args)
    manifest, plain = read_manifest(out), read_manifest(workspace / "tuned")
    assert manifest.weights_sha256 == plain.weights_sha256  # calibration changes no weight
    assert manifest.metrics["calibration"] == "platt"
    val = manifest.metrics["val"]
    assert val["gap_uncalibrated"] == pytest.approx(plain.metrics["val"]["gap"], abs=1e-5)
    assert {"ece", "ece_uncalibrated"} <= set(val) and val["calibrated_classes"] >= 1
    scaled = [c for c in manifest.classes if c.calibrated]
    assert len(scaled) == val["calibrated_classes"] and all(c.calibration.startswith("platt") for c in scaled)
    assert all("identity" in c.calibration for c in manifest.classes if not c.calibrated)
    # The thresholds are chosen on the calibrated probabilities: the ones the artifact's Predictor stores.
    labels = spark.read.format("delta").load(str(workspace / "sample" / "labels")).where("split = 'val'")
    labels = labels.orderBy("image_id").toPandas()
    predictor = Predictor.load(str(out), device="cpu")
    loaded = load_pixels(list(labels["uri"]), predictor.spec, FetchCfg(allowed_schemes=("file",)), DecodeCfg())
    probs, _ = predictor.predict(loaded.pixels)
    y = np.array([[c.name in row for c in manifest.classes] for row in labels["labels"]])
    recomputed = choose_thresholds(y, probs, 0.8, seed=TRAIN_SEED)
    np.testing.assert_allclose([c.threshold for c in manifest.classes], [t.threshold for t in recomputed], atol=1e-4)
    # Evaluation: ece on the calibrated probabilities, and the uncalibrated numbers equal t1's on the same images.
    overall = _run(evaluate_job.main, args)["overall"]
    before = jobs_ran["evaluate"]["overall"]
    assert overall["ece_uncalibrated"] == pytest.approx(before["ece"], abs=1e-5)
    assert overall["gap_uncalibrated"] == pytest.approx(before["gap"], abs=1e-5)
    assert overall["gap_at_10_uncalibrated"] == pytest.approx(before["gap_at_10"], abs=1e-5)
    assert overall["map"] == pytest.approx(before["map"], abs=1e-5)  # a monotone scaling keeps every class's AP
    rows = spark.read.format("delta").load(str(workspace / "metrics-platt")).where("class IS NULL").collect()
    assert {"ece", "ece_uncalibrated", "gap_uncalibrated"} <= {r["metric"] for r in rows}
    assert "ece_uncalibrated" in (workspace / "reports-platt" / "t1-platt-test" / "report.md").read_text()


def _holdout_classes() -> list[ClassEntry]:
    return [ClassEntry(c.name, c.prompt, 0.5, zero_shot=True) for c in CLASSES if c.name in HOLDOUTS]


def test_training_records_the_base_models_zero_shot_estimates(workspace, jobs_ran, spark) -> None:
    """metrics.zero_shot_base: the validation AUC and threshold each holdout prompt earns on the base model."""
    manifest = read_manifest(workspace / "tuned")
    recorded = manifest.metrics["zero_shot_base"]
    assert set(recorded) == set(manifest.metrics["zero_shot"])
    labels = spark.read.format("delta").load(str(workspace / "sample" / "labels")).where("split = 'val'")
    labels = labels.orderBy("image_id").toPandas()
    base = Predictor.load(str(workspace / "base"), zero_shot=_holdout_classes(), device="cpu")
    loaded = load_pixels(list(labels["uri"]), base.spec, FetchCfg(allowed_schemes=("file",)), DecodeCfg())
    probs, _ = base.predict(loaded.pixels)
    for name, entry in recorded.items():
        y = np.array([name in row for row in labels["labels"]])
        assert entry["auc"] == pytest.approx(metrics.roc_auc(y, probs[:, base.class_names.index(name)]), abs=1e-5)


def test_zero_shot_from_base_scores_the_extras_with_the_base_model(workspace, jobs_ran, spark) -> None:
    holdouts = _holdout_classes()
    tuned = Predictor.load(str(workspace / "tuned"), zero_shot=holdouts, device="cpu")
    mixed = Predictor.load(str(workspace / "tuned"), zero_shot=holdouts, device="cpu", zero_shot_from="base")
    base = Predictor.load(str(workspace / "base"), zero_shot=holdouts, device="cpu")
    uris = sorted(str(p) for p in (workspace / "sample" / "images").rglob("*.jpg"))[:24]
    pixels = load_pixels(uris, tuned.spec, FetchCfg(allowed_schemes=("file",)), DecodeCfg()).pixels
    (p_tuned, e_tuned), (p_mixed, e_mixed), (p_base, _) = (p.predict(pixels) for p in (tuned, mixed, base))
    n = len(tuned.manifest.classes)
    assert mixed.class_names == tuned.class_names
    np.testing.assert_array_equal(e_mixed, e_tuned)  # the stored embedding stays the fine-tuned model's
    np.testing.assert_allclose(p_mixed[:, :n], p_tuned[:, :n], rtol=0, atol=1e-6)
    for j, name in enumerate(mixed.class_names[n:], start=n):
        np.testing.assert_allclose(p_mixed[:, j], p_base[:, base.class_names.index(name)], rtol=0, atol=1e-6)
    recorded = read_manifest(workspace / "tuned").metrics["zero_shot_base"]
    for c in mixed.classes[n:]:
        assert c.threshold == pytest.approx(recorded[c.name]["threshold"] if c.name in recorded else 0.5)
    with pytest.raises(ValueError, match="zero_shot_from=base"):
        mixed.class_head([holdouts[0].name])


def test_zero_shot_from_base_refuses_a_base_that_is_not_the_one_training_started_from(workspace, jobs_ran,
                                                                                     tmp_path) -> None:
    moved = copy_artifact(workspace / "tuned", tmp_path / "tuned")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["training_data"]["base"]["artifact"] = str(workspace / "tuned")  # other weights
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="was fine-tuned from"):
        Predictor.load(str(moved), zero_shot=_holdout_classes(), device="cpu", zero_shot_from="base")
    manifest["training_data"]["base"] = {"clip_weights": "hf-hub:org/clip", "architecture": "ViT-B-32"}
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="open_clip weights hf-hub:org/clip.*zero_shot_from=self"):
        Predictor.load(str(moved), zero_shot=_holdout_classes(), device="cpu", zero_shot_from="base")
    # without zero-shot classes there is nothing for the base to score: it is not even read
    assert Predictor.load(str(moved), device="cpu", zero_shot_from="base").base is None


def test_evaluate_with_zero_shot_from_base_reports_the_base_models_holdout_auc(workspace, jobs_ran) -> None:
    args = _args(workspace) + ["--set", f"evaluate.report_dir={workspace / 'reports-from-base'}"]
    mixed = _run(evaluate_job.main, args + ["--set", "model.zero_shot_from=base"])
    base = _run(evaluate_job.main, args + ["--set", f"model.artifact={workspace / 'base'}"])
    tuned = jobs_ran["evaluate"]
    for name in ("gap", "gap_at_10", "map"):
        assert mixed["overall"][name] == pytest.approx(tuned["overall"][name], abs=1e-6)
    for name in HOLDOUTS:
        assert mixed["zero_shot"][name]["auc"] == pytest.approx(base["zero_shot"][name]["auc"], abs=1e-5)


def test_tagging_with_zero_shot_from_base_stores_the_base_models_zero_shot_scores(workspace, jobs_ran, spark,
                                                                                   tmp_path, capsys) -> None:
    holdouts = _holdout_classes()
    zero_shot = json.dumps([{"name": c.name, "prompt": c.prompt, "threshold": 0.5} for c in holdouts])
    args = tag_args(tmp_path, str(workspace / "sample" / "catalogue"), workspace / "tuned",
                    "--set", f"model.zero_shot={zero_shot}", "--set", "model.zero_shot_from=base",
                    "--set", f"fetch.local_roots=[{workspace / 'sample' / 'images'}]")
    summary, log = run_tag_job(capsys, args)
    assert summary["processed"] == 120 and "scored by the base model" in log
    rows = spark.read.format("delta").load(str(tmp_path / "predictions")).orderBy("image_id").limit(16).toPandas()
    base = Predictor.load(str(workspace / "base"), zero_shot=holdouts, device="cpu")
    pixels = load_pixels(list(rows["uri"]), base.spec, FetchCfg(allowed_schemes=("file",)), DecodeCfg()).pixels
    probs, _ = base.predict(pixels)
    for c in holdouts:
        stored = np.array([row[c.name] for row in rows["zero_shot_probs"]])
        np.testing.assert_allclose(stored, probs[:, base.class_names.index(c.name)], rtol=0, atol=1e-5)
