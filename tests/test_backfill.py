"""Backfills in chunks: every row once, and a killed run resumes without loss or duplicates."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from mumic_batch.config import SampleCfg
from mumic_batch.core.sample import generate_sample
from mumic_batch.pipeline.runs import RunRecord
from mumic_batch.pipeline.sample import CATALOGUE
from mumic_batch.tables.io import append_rows
from mumic_batch.tables.schemas import RUNS
from tests.fixtures.tagging import run_tag_job, start_tag_job, tag_args, expire_leases

pytestmark = pytest.mark.spark

MERGED = re.compile(r"run (\w+): chunk 1/(\d+) merged into predictions")


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory) -> list[tuple]:
    """24 sample images as catalogue rows (image_id, uri, updated_at)."""
    root = tmp_path_factory.mktemp("backfill")
    sample = generate_sample(SampleCfg(out_dir=str(root / "sample"), n_images=24, seed=5))
    return [(r.image_id, r.uri, r.updated_at.to_pydatetime()) for r in sample.catalogue.itertuples(index=False)]


@pytest.fixture(scope="module")
def catalogue(spark, sample_rows, tmp_path_factory) -> str:
    """The 24 rows as a Delta catalogue."""
    path = str(tmp_path_factory.mktemp("catalogue") / "catalogue")
    spark.createDataFrame(sample_rows, CATALOGUE).write.format("delta").save(path)
    return path


def backfill_args(tmp: Path, catalogue: str, artifact: Path) -> list[str]:
    return tag_args(tmp, catalogue, artifact, "--set", "tag.chunk_rows=8")


def staging_entries(tmp: Path) -> list[str] | None:
    """The run directories under the staging root; None when no staging root is left at all."""
    root = tmp / "predictions__staging"
    return sorted(p.name for p in root.iterdir()) if root.exists() else None


def test_chunked_run_tags_every_row_once_and_records_chunks(spark, capsys, tmp_path, catalogue, tiny_artifact):
    summary, _ = run_tag_job(capsys, backfill_args(tmp_path, catalogue, tiny_artifact))
    assert summary["processed"] == 24 and summary["chunks"] == 3
    preds = spark.read.format("delta").load(str(tmp_path / "predictions"))
    assert preds.count() == 24 and preds.select("image_id").distinct().count() == 24
    assert {r["run_id"] for r in preds.select("run_id").distinct().collect()} == {summary["run_id"]}
    run = spark.read.format("delta").load(str(tmp_path / "runs")).first()
    assert (run["chunks"], run["chunks_merged"], run["processed"]) == (3, 3, 24)
    assert sum(run["status_counts"].values()) == 24
    assert staging_entries(tmp_path) is None


def kill_after_first_chunk(proc: subprocess.Popen, log_file: Path, timeout_s: float = 300) -> str:
    """SIGKILL the whole job as soon as it logs its first merged chunk; return that run's id."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = MERGED.search(log_file.read_text())
            if found:
                return found.group(1)
            time.sleep(0.05)
        pytest.fail(f"the job never logged a merged chunk:\n{log_file.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow  # a driver of its own, killed mid-run: make test-slow
def test_killed_backfill_resumes_without_loss_or_duplicates(spark, capsys, tmp_path, catalogue, tiny_artifact):
    args = backfill_args(tmp_path, catalogue, tiny_artifact)
    killed_run = kill_after_first_chunk(start_tag_job(args, tmp_path / "job.log"), tmp_path / "job.log")
    preds = spark.read.format("delta").load(str(tmp_path / "predictions"))
    merged = {r["image_id"] for r in preds.select("image_id").collect()}
    assert 0 < len(merged) < 24, "the kill must land between the first chunk's MERGE and the last"
    assert staging_entries(tmp_path) == [killed_run]  # a killed driver cannot clean up
    expire_leases(spark, tmp_path / "predictions")  # until then a new run exits: see test_operations

    summary, log = run_tag_job(capsys, args)

    assert summary["selection"] == "anti_join" and summary["processed"] == 24 - len(merged)
    rows = spark.read.format("delta").load(str(tmp_path / "predictions"))
    assert rows.count() == 24 and rows.select("image_id").distinct().count() == 24
    first = rows.where(F.col("image_id").isin(*merged)).select("run_id", "attempts").distinct().collect()
    assert [(r["run_id"], r["attempts"]) for r in first] == [(killed_run, 1)]  # not scored again
    assert re.search(rf"WARNING .*taking over the expired lease of run {killed_run}", log)
    assert re.search(rf"WARNING .*removing staging directory .*{killed_run}", log)
    assert staging_entries(tmp_path) is None
    assert run_tag_job(capsys, args)[0]["processed"] == 0


@pytest.mark.slow  # a driver of its own, killed mid-run: make test-slow
def test_killed_change_feed_run_resumes_from_the_last_successful_version(spark, capsys, tmp_path, sample_rows,
                                                                        tiny_artifact):
    path = str(tmp_path / "catalogue")
    first, later = sample_rows[:8], sample_rows[8:]
    writer = spark.createDataFrame(first, CATALOGUE).write.format("delta")
    writer.option("delta.enableChangeDataFeed", "true").save(path)
    args = backfill_args(tmp_path, path, tiny_artifact)
    assert run_tag_job(capsys, args)[0]["processed"] == 8
    spark.createDataFrame(later, CATALOGUE).write.format("delta").mode("append").save(path)
    kill_after_first_chunk(start_tag_job(args, tmp_path / "job.log"), tmp_path / "job.log")
    merged = spark.read.format("delta").load(str(tmp_path / "predictions")).count() - 8
    assert 0 < merged < 16
    expire_leases(spark, tmp_path / "predictions")

    # The killed run recorded no catalogue version, so the change feed starts after the first run's.
    summary, _ = run_tag_job(capsys, args)

    assert summary["selection"] == "change_feed" and summary["processed"] == 16 - merged
    rows = spark.read.format("delta").load(str(tmp_path / "predictions"))
    assert rows.count() == 24 and rows.select("image_id").distinct().count() == 24


def test_runs_table_from_before_chunking_gains_the_columns(spark, tmp_path):
    old = StructType([f for f in RUNS.fields if not f.name.startswith("chunks")])
    path = str(tmp_path / "runs")
    old_row = RunRecord("tag_images", {}).row("succeeded")[:len(old)]
    spark.createDataFrame([old_row], old).write.format("delta").save(path)
    record = RunRecord("tag_images", {}, chunks=4, chunks_merged=2)
    append_rows(spark, [record.row("failed")], RUNS, path)
    rows = spark.read.format("delta").load(path).orderBy("outcome").collect()
    got = [(r["outcome"], r["chunks"], r["chunks_merged"]) for r in rows]
    assert got == [("failed", 4, 2), ("succeeded", None, None)]
