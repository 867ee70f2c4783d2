"""Nightly tagging: catalogue -> work selection -> model UDF -> staged Delta -> keyed MERGE -> runs row."""

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
from mumic_batch.tables.io import delete_path, merge_predictions, read_table
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
    todo = selection.rows
    record.source, record.source_version = cfg.tables.catalogue, selection.source_version
    record.selection = selection.method
    record.processed = todo.count()
    log.info("run %s: %d catalogue rows, %d to process (selected by %s)", record.run_id, record.input_rows,
             record.processed, selection.method)
    if record.processed:
        _score_and_merge(spark, cfg, record, todo, manifest)
    else:
        record.message = "nothing to do: every catalogue row already has a current prediction"
        log.info("run %s: %s", record.run_id, record.message)
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


def _score_and_merge(spark: SparkSession, cfg: JobCfg, record: RunRecord, todo: DataFrame, manifest) -> None:
    tasks = score_tasks(cfg.tag, record.processed or 0, spark.sparkContext.defaultParallelism)
    # An explicit count survives adaptive execution, which would otherwise coalesce a small URI table
    # into a single task and leave every other task slot (and GPU) idle.
    todo = todo.repartition(tasks)
    log.info("run %s: scoring in %d tasks", record.run_id, tasks)
    spec = EngineSpec(
        artifact=cfg.model.artifact,
        weights_sha256=manifest.weights_sha256,
        zero_shot=tuple(ZeroShotClass(z.name, z.prompt, z.threshold) for z in cfg.model.zero_shot),
        fetch=cfg.fetch, decode=cfg.decode, infer=cfg.infer,
    )
    scored = with_predictions(todo, spec).select(
        "*",
        F.lit(manifest.name).alias("model_name"),
        F.lit(manifest.version).alias("model_version"),
        F.lit(manifest.weights_sha256).alias("model_sha256"),
        F.lit(1).alias("attempts"),
        F.lit(record.run_id).alias("run_id"),
        F.current_timestamp().alias("tagged_at"),
    )
    staging = f"{cfg.tables.predictions.rstrip('/')}__staging/{record.run_id}"
    started = time.perf_counter()
    # Materialise the UDF once: MERGE reads its source twice and fetching is not deterministic.
    scored.write.format("delta").mode("overwrite").save(staging)
    scored_s = time.perf_counter() - started
    staged = spark.read.format("delta").load(staging)
    _record_stats(record, staged, scored_s)
    merge_started = time.perf_counter()
    merge_predictions(spark, staged.select(*[f.name for f in PREDICTIONS.fields]), cfg.tables.predictions,
                      manifest.version)
    record.stage_seconds["write"] = time.perf_counter() - merge_started
    delete_path(spark, staging)
    log.info("run %s: merged %d rows into %s (%.1f images/s)", record.run_id, record.processed,
             cfg.tables.predictions, record.images_per_s or 0.0)


def score_tasks(tag: TagCfg, rows: int, slots: int) -> int:
    """tag.partitions when set; else one task per slot, but no task with fewer than rows_per_task rows."""
    if tag.partitions:
        return tag.partitions
    return max(1, min(slots, -(-rows // tag.rows_per_task)))


def _record_stats(record: RunRecord, staged: DataFrame, scored_s: float) -> None:
    """Counts by status and summed stage times, from one aggregation over the staged rows."""
    rows = staged.groupBy("status").agg(F.count("*").alias("n"), *[F.sum(c).alias(c) for c in TIMING_COLUMNS]).collect()
    record.status_counts = {r["status"]: int(r["n"]) for r in rows}
    record.stage_seconds = {
        c.removesuffix("_ms"): sum(float(r[c] or 0.0) for r in rows) / 1000.0 for c in TIMING_COLUMNS
    }
    record.stage_seconds["score_wall"] = scored_s
    record.images_per_s = record.processed / scored_s if scored_s > 0 else None
    log.info("run %s: status counts %s", record.run_id, record.status_counts)


def summary(cfg: JobCfg, record: RunRecord) -> dict:
    """The job's one-line JSON summary."""
    return {
        "job": JOB,
        "run_id": record.run_id,
        "model_version": record.model_version,
        "input_rows": record.input_rows,
        "processed": record.processed,
        "selection": record.selection,
        "status_counts": record.status_counts,
        "images_per_s": record.images_per_s,
        "predictions": cfg.tables.predictions,
        "runs": cfg.tables.runs,
    }
