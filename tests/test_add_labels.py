"""jobs/add_labels.py: zero-shot classes scored from stored embeddings equal what tagging stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jobs import add_labels
from mumic_batch.model.predictor import Predictor
from mumic_batch.pipeline.add_labels import chosen_classes
from tests.fixtures.models import random_pixels, write_tiny_artifact
from tests.fixtures.stored import STORED_CLASSES, zero_shot_set

CLASSES = STORED_CLASSES
ADDED = ("pool", "seven")  # the reference table has them from tagging; the copy gets them from add_labels


def test_class_head_scores_embeddings_as_the_predictor_does(tiny_artifact):
    predictor = Predictor.load(str(tiny_artifact), zero_shot=CLASSES, device="cpu")
    probs, emb = predictor.predict(random_pixels(6, seed=4))
    head = predictor.class_head(ADDED)
    columns = [predictor.class_names.index(n) for n in ADDED]
    np.testing.assert_allclose(head.probs(emb), probs[:, columns], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(head.thresholds, predictor.thresholds[columns])


def test_classes_come_from_model_zero_shot():
    assert chosen_classes(CLASSES, ()) == CLASSES
    assert [c.name for c in chosen_classes(CLASSES, ("seven", "pool"))] == ["pool", "seven"]
    with pytest.raises(ValueError, match="not in model.zero_shot"):
        chosen_classes(CLASSES, ("volcano",))
    with pytest.raises(ValueError, match="model.zero_shot is empty"):
        chosen_classes((), ())


def without_added(spark, tagged_sample: Path, out: Path) -> str:
    """A copy of the reference table as tagging with only the first class would have written it."""
    from pyspark.sql import functions as F

    from mumic_batch.tables.io import ensure_predictions

    names = F.array(*[F.lit(n) for n in ADDED])
    rows = spark.read.format("delta").load(str(tagged_sample / "tagged" / "predictions")).select(
        "*",
        F.map_filter("zero_shot_probs", lambda k, _: ~F.array_contains(names, k)).alias("zp"),
        F.filter("zero_shot_labels", lambda x: ~F.array_contains(names, x)).alias("zl"))
    rows = rows.drop("zero_shot_probs", "zero_shot_labels").withColumnsRenamed(
        {"zp": "zero_shot_probs", "zl": "zero_shot_labels"})
    ensure_predictions(spark, str(out))
    from mumic_batch.tables.schemas import PREDICTIONS

    rows.select(*PREDICTIONS.names).write.format("delta").mode("append").save(str(out))
    return str(out)


def by_id(spark, path: str) -> dict[str, dict]:
    return {r["image_id"]: r.asDict(recursive=True) for r in spark.read.format("delta").load(path).collect()}


def run_add_labels(capsys, predictions: str, runs: str, artifact: Path, *extra: str) -> tuple[int, dict]:
    code = add_labels.main(["--set", f"tables.predictions={predictions}", "--set", f"tables.runs={runs}",
                            "--set", f"model.artifact={artifact}", "--set", zero_shot_set(), *extra])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.spark
def test_added_classes_equal_tagging_with_them(spark, capsys, tmp_path, tagged_sample, tiny_artifact):
    reference = by_id(spark, str(tagged_sample / "tagged" / "predictions"))
    labelled = {lab for r in reference.values() for lab in (r["zero_shot_labels"] or ()) if lab in ADDED}
    unlabelled = [r for r in reference.values() if r["status"] == "ok" and not set(ADDED) <= set(r["zero_shot_labels"])]
    assert labelled and unlabelled  # the thresholds split the sample: labels are a real check
    partial = without_added(spark, tagged_sample, tmp_path / "predictions")
    code, summary = run_add_labels(capsys, partial, str(tmp_path / "runs"), tiny_artifact,
                                   "--set", f"add_labels.classes=[{', '.join(ADDED)}]")
    assert code == 0, summary
    ok = [r for r in reference.values() if r["status"] == "ok"]
    assert summary["classes"] == list(ADDED) and summary["processed"] == len(ok) == 11
    assert summary["input_rows"] == summary["updated_rows"] == 12
    result = by_id(spark, partial)
    assert result.keys() == reference.keys()
    for image_id, want in reference.items():
        got = result[image_id]
        assert got["zero_shot_labels"] == want["zero_shot_labels"], image_id
        if want["zero_shot_probs"] is None:
            assert got["zero_shot_probs"] is None and want["status"] != "ok"
        else:
            assert list(got["zero_shot_probs"]) == list(want["zero_shot_probs"])  # same classes, same order
            np.testing.assert_allclose([got["zero_shot_probs"][k] for k in want["zero_shot_probs"]],
                                       list(want["zero_shot_probs"].values()), rtol=0, atol=1e-6)
        rest = [c for c in want if c not in ("zero_shot_probs", "zero_shot_labels")]
        assert {c: got[c] for c in rest} == {c: want[c] for c in rest}, image_id
    from delta.tables import DeltaTable

    merge = DeltaTable.forPath(spark, partial).history(1).first()["operationMetrics"]
    assert merge["numTargetDeletionVectorsAdded"] == "0"  # the failed row too: old files removed whole
    run = spark.read.format("delta").load(str(tmp_path / "runs")).first()
    assert (run["job"], run["outcome"], run["processed"], run["input_rows"]) == ("add_labels", "succeeded", 11, 12)
    assert run["status_counts"] == {"ok": 11, "not_found": 1} and run["images_per_s"] > 0
    assert set(run["stage_seconds"]) == {"text", "score", "write"}
    assert not Path(f"{partial}__staging").exists()  # its staging data and the empty root are gone


@pytest.mark.spark
def test_rows_retagged_meanwhile_keep_their_scores(spark, tmp_path, tagged_sample):
    from mumic_batch.tables.io import merge_zero_shot
    from mumic_batch.tables.schemas import ZERO_SHOT_SCORES

    partial = without_added(spark, tagged_sample, tmp_path / "predictions")
    before = by_id(spark, partial)
    ok = sorted(i for i, r in before.items() if r["status"] == "ok")
    scores = [(ok[0], before[ok[0]]["run_id"], {"pool": 0.5}, ["pool"]),
              (ok[1], "a-later-tagging-run", {"pool": 0.5}, ["pool"])]
    metrics = merge_zero_shot(spark, spark.createDataFrame(scores, ZERO_SHOT_SCORES), partial,
                              before[ok[0]]["model_version"], ("pool",))
    after = by_id(spark, partial)
    assert int(metrics["numTargetRowsUpdated"]) == 1
    assert after[ok[0]]["zero_shot_probs"] == {**before[ok[0]]["zero_shot_probs"], "pool": 0.5}
    assert after[ok[0]]["zero_shot_labels"] == before[ok[0]]["zero_shot_labels"] + ["pool"]
    assert after[ok[1]] == before[ok[1]]


@pytest.mark.spark
def test_embeddings_of_other_weights_fail_the_run(spark, capsys, tmp_path, tagged_sample):
    # Same name and version, other weights: the stored embeddings are not this text tower's.
    write_tiny_artifact(tmp_path / "other", seed=7)
    code, summary = run_add_labels(capsys, str(tagged_sample / "tagged" / "predictions"), str(tmp_path / "runs"),
                                   tmp_path / "other")
    assert code == 1 and "cannot be scored with this text tower" in summary["error"]
    run = spark.read.format("delta").load(str(tmp_path / "runs")).first()
    assert run["outcome"] == "failed" and run["job"] == "add_labels"


@pytest.mark.spark
def test_zero_shot_from_base_is_refused_before_anything_is_read(spark, capsys, tmp_path, tagged_sample):
    predictions = tagged_sample / "tagged" / "predictions"
    before = spark.read.format("delta").load(str(predictions)).count()
    code, summary = run_add_labels(capsys, str(predictions), str(tmp_path / "runs"), tmp_path / "no-such-artifact",
                                   "--set", "model.zero_shot_from=base")
    assert code == 1 and summary["error"].startswith("ValueError: model.zero_shot_from=base: add_labels scores")
    assert spark.read.format("delta").load(str(predictions)).count() == before
