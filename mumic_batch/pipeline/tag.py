"""Tagging: catalogue -> work selection -> worklist in chunks -> per chunk: model UDF -> staged Delta ->
keyed MERGE -> runs row. Nightly runs are one chunk; backfills many, resumable after a crash."""

from __future__ import annotations

import logging
import time

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from mumic_batch.config import JobCfg, TagCfg, to_dict
from mumic_batch.io.storage import localize_dir
from mumic_batch.model.artifact import read_manifest
from mumic_batch.pipeline.runs import RunRecord, recorded
from mumic_batch.pipeline.selection import catalogue_version, select_work
from mumic_batch.spark.udf import EngineSpec, ZeroShotClass, with_predictions
from mumic_batch.tables.io import delete_path, list_dir, merge_predictions, read_table
from mumic_batch.tables.schemas import PREDICTIONS, TIMING_COLUMNS

log = logging.getLogger(__name__)

JOB = "tag_images"


def run(spark: SparkSession, cfg: JobCfg) -> dict:
    """Tag the catalogue's new, changed and retryable rows; return the run summary."""
    record = RunRecord(JOB, to_dict(cfg))
    return recorded(spark, record, cfg.tables.runs, lambda: _tag(spark, cfg, record))


def _tag(spark: SparkSession, cfg: JobCfg, record: RunRecord) -> dict:
    manifest = read_manifest(localize_dir(cfg.model.artifact))
    record.model_name, record.model_version = manifest.name, manifest.version
    log.info("run %s: model %s version %s from %s", record.run_id, manifest.name, manifest.version,
             cfg.model.artifact)
    source = catalogue_version(spark, cfg.tables)
    # Read exactly the version recorded in the runs row, so the next change-feed run starts after it.
    catalogue = catalogue_rows(read_table(spark, cfg.tables.catalogue, cfg.tables.catalogue_format, source[0]))
    record.input_rows = catalogue.count()
    selection = select_work(spark, catalogue, cfg.tables, cfg.tag, manifest.version, source)
    record.source, record.source_version = cfg.tables.catalogue, selection.source_version
    record.selection = selection.method
    staging = _staging(spark, cfg.tables.predictions, record.run_id)
    try:
        chunks = _plan_chunks(spark, selection.rows, f"{staging}/worklist", cfg.tag)
        record.processed, record.chunks = sum(rows for _, rows in chunks), len(chunks)
        log.info("run %s: %d catalogue rows, %d to process (selected by %s), chunks: %d", record.run_id,
                 record.input_rows, record.processed, selection.method, record.chunks)
        if record.processed:
            _score_chunks(spark, cfg, record, staging, chunks, manifest)
        else:
            record.message = "nothing to do: every catalogue row already has a current prediction"
            log.info("run %s: %s", record.run_id, record.message)
    finally:
        delete_path(spark, staging)
    return summary(cfg, record)


def catalogue_rows(df: DataFrame) -> DataFrame:
    """image_id (derived from the URI when absent), uri and source_updated_at, one row per image_id."""
    if "uri" not in df.columns:
        raise ValueError(f"catalogue has no 'uri' column (columns: {', '.join(df.columns)})")
    if "image_id" not in df.columns:
        # Same rule as mumic_batch.core.ids.image_id_for: first 16 hex chars of sha1(uri).
        df = df.withColumn("image_id", F.substring(F.sha1(F.col("uri")), 1, 16))
    updated = F.col("updated_at").cast("timestamp") if "updated_at" in df.columns else F.lit(None).cast("timestamp")
    df = df.select(F.col("image_id").cast("string"), F.col("uri").cast("string"),
                   updated.alias("source_updated_at"))
    latest = Window.partitionBy("image_id").orderBy(F.col("source_updated_at").desc_nulls_last(), F.col("uri"))
    return df.withColumn("_n", F.row_number().over(latest)).where("_n = 1").drop("_n")


def _staging(spark: SparkSession, predictions: str, run_id: str) -> str:
    """This run's staging directory; warns about directories that other runs left behind."""
    root = f"{predictions.rstrip('/')}__staging"
    others = [name for name in list_dir(spark, root) if name != run_id]
    if others:
        log.warning("%d staging directories of other runs are under %s (runs still going, or killed before "
                    "they cleaned up: %s); delete those of runs that are not running", len(others), root,
                    ", ".join(others[:5]))
    return f"{root}/{run_id}"


def _plan_chunks(spark: SparkSession, todo: DataFrame, path: str, tag: TagCfg) -> list[tuple[DataFrame, int]]:
    """The rows to process as (rows, count) chunks of about tag.chunk_rows.

    One chunk is `todo` itself. More are read from a worklist written once to `path` and split by a
    hash of image_id, so every chunk is a fixed set of rows whatever the MERGEs before it change.
    """
    rows = todo.count()
    if rows <= tag.chunk_rows:
        return [(todo, rows)] if rows else []
    n = -(-rows // tag.chunk_rows)
    chunk = F.pmod(F.xxhash64("image_id"), F.lit(n)).cast("int").alias("chunk")
    # One shuffle partition per chunk value keeps each chunk in a few files, not one per task.
    todo.select("*", chunk).repartition("chunk").write.format("delta").partitionBy("chunk").save(path)
    worklist = spark.read.format("delta").load(path)
    counts = sorted((int(r["chunk"]), int(r["count"])) for r in worklist.groupBy("chunk").count().collect())
    return [(worklist.where(F.col("chunk") == c).drop("chunk"), count) for c, count in counts]


def _score_chunks(spark: SparkSession, cfg: JobCfg, record: RunRecord, staging: str,
                  chunks: list[tuple[DataFrame, int]], manifest) -> None:
    """Score and MERGE chunk by chunk: a crash loses at most the chunk in flight, and a rerun resumes."""
    spec = EngineSpec(
        artifact=cfg.model.artifact,
        weights_sha256=manifest.weights_sha256,
        zero_shot=tuple(ZeroShotClass(z.name, z.prompt, z.threshold) for z in cfg.model.zero_shot),
        fetch=cfg.fetch, decode=cfg.decode, infer=cfg.infer,
    )
    record.chunks_merged, done, started = 0, 0, time.perf_counter()
    for n, (todo, rows) in enumerate(chunks, start=1):
        log.info("run %s: chunk %d/%d: scoring %d rows", record.run_id, n, len(chunks), rows)
        _score_and_merge(spark, cfg, record, todo, rows, spec, f"{staging}/scored-{n}")
        record.chunks_merged, done = n, done + rows
        _log_progress(record, done, time.perf_counter() - started)
    wall = record.stage_seconds["score_wall"]
    record.images_per_s = record.processed / wall if wall > 0 else None


def _score_and_merge(spark: SparkSession, cfg: JobCfg, record: RunRecord, todo: DataFrame, rows: int,
                     spec: EngineSpec, staging: str) -> None:
    tasks = score_tasks(cfg.tag, rows, spark.sparkContext.defaultParallelism)
    # An explicit count survives adaptive execution, which would otherwise coalesce a small URI table
    # into a single task and leave every other task slot (and GPU) idle.
    todo = todo.repartition(tasks)
    log.info("run %s: scoring in %d tasks", record.run_id, tasks)
    scored = with_predictions(todo, spec).select(
        "*",
        F.lit(record.model_name).alias("model_name"),
        F.lit(record.model_version).alias("model_version"),
        F.lit(spec.weights_sha256).alias("model_sha256"),
        F.lit(1).alias("attempts"),
        F.lit(record.run_id).alias("run_id"),
        F.current_timestamp().alias("tagged_at"),
    )
    started = time.perf_counter()
    # Materialise the UDF once: MERGE reads its source twice and fetching is not deterministic.
    scored.write.format("delta").mode("overwrite").save(staging)
    scored_s = time.perf_counter() - started
    staged = spark.read.format("delta").load(staging)
    _add_stats(record, staged, scored_s)
    merge_started = time.perf_counter()
    merge_predictions(spark, staged.select(*[f.name for f in PREDICTIONS.fields]), cfg.tables.predictions,
                      record.model_version)
    _add_seconds(record, "write", time.perf_counter() - merge_started)
    delete_path(spark, staging)


def _log_progress(record: RunRecord, done: int, elapsed: float) -> None:
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (record.processed - done) / rate if rate else 0.0
    log.info("run %s: chunk %d/%d merged into predictions: %d of %d rows (%.0f%%), %.1f images/s, about %.0f s left",
             record.run_id, record.chunks_merged, record.chunks, done, record.processed,
             100.0 * done / record.processed, rate, left)


def score_tasks(tag: TagCfg, rows: int, slots: int) -> int:
    """tag.partitions when set; else one task per slot, but no task with fewer than rows_per_task rows."""
    if tag.partitions:
        return tag.partitions
    return max(1, min(slots, -(-rows // tag.rows_per_task)))


def _add_stats(record: RunRecord, staged: DataFrame, scored_s: float) -> None:
    """Add one chunk's counts by status and summed stage times, from one aggregation over its rows."""
    rows = staged.groupBy("status").agg(F.count("*").alias("n"), *[F.sum(c).alias(c) for c in TIMING_COLUMNS]).collect()
    for r in rows:
        record.status_counts[r["status"]] = record.status_counts.get(r["status"], 0) + int(r["n"])
    for c in TIMING_COLUMNS:
        _add_seconds(record, c.removesuffix("_ms"), sum(float(r[c] or 0.0) for r in rows) / 1000.0)
    _add_seconds(record, "score_wall", scored_s)
    log.info("run %s: status counts so far %s", record.run_id, record.status_counts)


def _add_seconds(record: RunRecord, stage: str, seconds: float) -> None:
    record.stage_seconds[stage] = record.stage_seconds.get(stage, 0.0) + seconds


def summary(cfg: JobCfg, record: RunRecord) -> dict:
    """The job's one-line JSON summary."""
    return {
        "job": JOB,
        "run_id": record.run_id,
        "model_version": record.model_version,
        "input_rows": record.input_rows,
        "processed": record.processed,
        "chunks": record.chunks,
        "selection": record.selection,
        "status_counts": record.status_counts,
        "images_per_s": record.images_per_s,
        "predictions": cfg.tables.predictions,
        "runs": cfg.tables.runs,
    }
