"""Nightly cost follows the work: change-feed updates, the retry table, deletion vectors, idempotent
appends, table upgrades in place and the maintenance job, on real local Spark and Delta tables."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from jobs import maintain
from mumic_batch.config import SampleCfg
from mumic_batch.core import status as st
from mumic_batch.core.sample import generate_sample
from mumic_batch.pipeline.sample import CATALOGUE
from mumic_batch.tables import retry
from mumic_batch.tables.io import append_predictions, ensure_delta, ensure_predictions
from mumic_batch.tables.schemas import PREDICTIONS, PREDICTIONS_PARTITION, RETRY
from tests.fixtures.tagging import run_tag_job, tag_args

pytestmark = pytest.mark.spark

OLD = datetime(2020, 1, 1)


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory) -> list[tuple]:
    """20 sample images as catalogue rows (image_id, uri, updated_at)."""
    root = tmp_path_factory.mktemp("incremental")
    sample = generate_sample(SampleCfg(out_dir=str(root / "sample"), n_images=20, seed=7))
    return [(r.image_id, r.uri, r.updated_at.to_pydatetime()) for r in sample.catalogue.itertuples(index=False)]


def cdf_catalogue(spark, rows, path) -> str:
    spark.createDataFrame(rows, CATALOGUE).write.format("delta").option("delta.enableChangeDataFeed", "true").save(
        str(path))
    return str(path)


def predictions(spark, tmp):
    return spark.read.format("delta").load(str(tmp / "predictions"))


def last_commit(spark, path) -> dict:
    row = DeltaTable.forPath(spark, str(path)).history(1).first()
    return {"operation": row["operation"], **{k: int(v) for k, v in (row["operationMetrics"] or {}).items()}}


def test_change_feed_updates_retag_only_rows_whose_input_changed(spark, capsys, tmp_path, sample_rows,
                                                                   tiny_artifact):
    catalogue = cdf_catalogue(spark, sample_rows, tmp_path / "catalogue")
    args = tag_args(tmp_path, catalogue, tiny_artifact)
    assert run_tag_job(capsys, args)[0]["processed"] == 20
    moved, touched, same = sample_rows[0], sample_rows[1], sample_rows[2]
    table = DeltaTable.forPath(spark, catalogue)
    table.update(F.col("image_id") == moved[0], {"uri": F.lit(sample_rows[5][1])})
    table.update(F.col("image_id") == touched[0], {"updated_at": F.col("updated_at") + F.expr("INTERVAL 1 DAY")})
    table.update(F.col("image_id") == same[0], {"uri": F.col("uri")})  # an update_postimage that changes nothing

    summary, _ = run_tag_job(capsys, args)

    assert summary["selection"] == "change_feed" and summary["processed"] == 2
    assert summary["input_rows"] == 20  # from the Delta log, not a scan
    rows = {r["image_id"]: r for r in predictions(spark, tmp_path).collect()}
    assert len(rows) == 20
    assert rows[moved[0]]["uri"] == sample_rows[5][1] and rows[moved[0]]["attempts"] == 1
    assert rows[touched[0]]["source_updated_at"] == touched[2].replace(tzinfo=None) + timedelta(days=1)
    assert rows[same[0]]["run_id"] != summary["run_id"]
    assert last_commit(spark, tmp_path / "predictions")["operation"] == "MERGE"  # changed rows are not appended
    assert run_tag_job(capsys, args)[0]["processed"] == 0


def test_retry_night_marks_the_retried_rows_deleted_and_rewrites_no_file(spark, capsys, tmp_path, sample_rows,
                                                                         tiny_artifact):
    catalogue = cdf_catalogue(spark, sample_rows, tmp_path / "catalogue")
    args = tag_args(tmp_path, catalogue, tiny_artifact, "--set", "tag.partitions=4")
    assert run_tag_job(capsys, args)[0]["processed"] == 20
    preds = str(tmp_path / "predictions")
    assert last_commit(spark, preds)["operation"] == "WRITE"  # a new partition is appended, not MERGEd
    # Two rows failed transiently last night, written among ok rows (as a chunk's append writes them);
    # every commit also puts such rows in the retry table.
    failed = [sample_rows[3][0], sample_rows[11][0]]
    is_failed = F.col("image_id").isin(*failed)
    night = predictions(spark, tmp_path).withColumn(
        "status", F.when(is_failed, F.lit(st.TIMEOUT)).otherwise(F.col("status"))).withColumn(
        "tagged_at", F.when(is_failed, F.lit(OLD)).otherwise(F.col("tagged_at")))
    rows = night.select(*PREDICTIONS.fieldNames()).collect()
    spark.createDataFrame(rows, PREDICTIONS).repartition(2).write.format("delta").mode("overwrite").save(preds)
    retry.add_failures(spark, preds, predictions(spark, tmp_path).where(is_failed), 3)
    files_before = set(spark.read.format("delta").load(preds).inputFiles())
    untouched = {r["image_id"]: r["run_id"] for r in predictions(spark, tmp_path).where(~is_failed).collect()}

    summary, _ = run_tag_job(capsys, args)

    assert summary["selection"] == "change_feed" and summary["processed"] == 2
    merge = last_commit(spark, preds)
    assert merge["operation"] == "MERGE" and merge["numTargetRowsUpdated"] == 2
    assert merge["numTargetRowsCopied"] == 0 and merge["numTargetFilesRemoved"] == 0
    assert merge["numTargetDeletionVectorsAdded"] >= 1
    rows = {r["image_id"]: r for r in predictions(spark, tmp_path).collect()}
    assert len(rows) == 20 and all(rows[i]["status"] == st.OK and rows[i]["attempts"] == 2 for i in failed)
    assert {i: rows[i]["run_id"] for i in untouched} == untouched
    assert files_before <= set(spark.read.format("delta").load(preds).inputFiles())  # no file rewritten
    assert spark.read.format("delta").load(retry.retry_path(preds)).count() == 0
    assert run_tag_job(capsys, args)[0]["processed"] == 0


def synthetic_predictions(spark, n: int, version: str, status: str = st.OK):
    rows = [(f"id{i:05d}", f"file:///img/{i}.jpg", None, status, None, {"a": 0.5}, ["a"], {}, [], [1.0, 0.0], "0" * 64,
             640, 480, "m", version, "0" * 64, 1, "run", OLD) for i in range(n)]
    return spark.createDataFrame(rows, PREDICTIONS)


def test_a_replayed_backfill_chunk_adds_no_rows(spark, tmp_path):
    path = str(tmp_path / "predictions")
    ensure_predictions(spark, path)
    assert append_predictions(spark, synthetic_predictions(spark, 30, "v2"), path, "tag_images:run-a", 1)
    assert not append_predictions(spark, synthetic_predictions(spark, 30, "v2"), path, "tag_images:run-a", 1)
    assert spark.read.format("delta").load(path).count() == 30
    assert append_predictions(spark, synthetic_predictions(spark, 30, "v3"), path, "tag_images:run-a", 2)
    assert spark.read.format("delta").load(path).count() == 60


def test_an_older_predictions_table_is_upgraded_in_place(spark, tmp_path):
    path = str(tmp_path / "predictions")
    old_properties = {"delta.enableChangeDataFeed": "true", "delta.dataSkippingStatsColumns": "image_id,status"}
    ensure_delta(spark, path, PREDICTIONS, (PREDICTIONS_PARTITION,), old_properties)
    synthetic_predictions(spark, 5, "v1").write.format("delta").mode("append").save(path)
    synthetic_predictions(spark, 3, "v0", status="http_503").write.format("delta").mode("append").save(path)

    ensure_predictions(spark, path)
    retry.ensure_retry(spark, path)

    props = DeltaTable.forPath(spark, path).detail().first()["properties"]
    assert props["delta.enableDeletionVectors"] == "true"
    assert spark.read.format("delta").load(path).count() == 8
    pending = spark.read.format("delta").load(retry.retry_path(path))
    assert pending.columns == RETRY.fieldNames() and [r["model_version"] for r in pending.collect()] == ["v0"] * 3
    assert retry.due(spark, path, "v0", retry_after_s=3600, max_attempts=3).count() == 3
    assert retry.due(spark, path, "v0", retry_after_s=3600, max_attempts=1).count() == 0


def test_maintenance_job_compacts_a_table_that_later_runs_read(spark, capsys, tmp_path, sample_rows, tiny_artifact):
    catalogue = cdf_catalogue(spark, sample_rows[:12], tmp_path / "catalogue")
    args = tag_args(tmp_path, catalogue, tiny_artifact, "--set", "tag.chunk_rows=4")
    assert run_tag_job(capsys, args)[0]["chunks"] == 3
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        summary = run_maintain(capsys, tmp_path)
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    assert summary["operations"]["predictions"]["optimize"]["operation"] == "OPTIMIZE"
    assert int(summary["operations"]["predictions"]["optimize"]["numAddedFiles"]) == 1
    assert len(spark.read.format("delta").load(str(tmp_path / "predictions")).inputFiles()) == 1

    spark.createDataFrame(sample_rows[12:], CATALOGUE).write.format("delta").mode("append").save(catalogue)
    later, _ = run_tag_job(capsys, args)

    assert later["selection"] == "change_feed" and later["processed"] == 8
    rows = predictions(spark, tmp_path)
    assert rows.count() == 20 and rows.select("image_id").distinct().count() == 20
    runs = spark.read.format("delta").load(str(tmp_path / "runs")).select("job").collect()
    assert sorted(r["job"] for r in runs) == ["maintain", "tag_images", "tag_images"]


def run_maintain(capsys, tmp) -> dict:
    """jobs/maintain.py with VACUUM retaining nothing; its JSON summary (asserting exit code 0)."""
    code = maintain.main(["--set", f"tables.predictions={tmp / 'predictions'}", "--set", f"tables.runs={tmp / 'runs'}",
                          "--set", "maintain.retain_hours=0"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    return summary
