"""The retry table beside predictions: the rows that failed with a transient status.

A nightly run reads its retry candidates here instead of scanning the predictions partition for
`status != 'ok'`. Every chunk commit keeps it a superset of the transient failures in predictions:
failures are added before the predictions commit and resolved rows removed after it, so a crash in
between leaves extra rows (which selection checks against predictions), never missing ones.
"""

from __future__ import annotations

import logging

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from mumic_batch.core import status as st
from mumic_batch.tables.io import ensure_delta, table_exists
from mumic_batch.tables.schemas import PREDICTION_KEYS, RETRY

log = logging.getLogger(__name__)

_ON = " AND ".join(f"t.{k} = s.{k}" for k in PREDICTION_KEYS)


def retry_path(predictions: str) -> str:
    """Where the retry table of a predictions table lives."""
    return f"{predictions.rstrip('/')}__retry"


def is_transient(status: Column) -> Column:
    """Spark form of mumic_batch.core.status.is_transient."""
    return status.isin(*st.TRANSIENT) | status.rlike(st.TRANSIENT_HTTP_PATTERN)


def ensure_retry(spark: SparkSession, predictions: str) -> None:
    """Create the retry table; for a predictions table from before it existed, fill it with one scan."""
    path = retry_path(predictions)
    if table_exists(spark, path):
        return
    if table_exists(spark, predictions):
        log.warning("building the retry table %s from the transient failures in %s (once)", path, predictions)
        failed = spark.read.format("delta").load(predictions).where(is_transient(F.col("status")))
        failed.select(*RETRY.fieldNames()).write.format("delta").mode("append").save(path)
    ensure_delta(spark, path, RETRY)


def due(spark: SparkSession, predictions: str, model_version: str, retry_after_s: float,
        max_attempts: int) -> DataFrame:
    """image_id of this version's transient failures with attempts left whose retry delay has passed."""
    cutoff = F.current_timestamp() - F.expr(f"INTERVAL {int(retry_after_s)} SECONDS")
    return (
        spark.read.format("delta").load(retry_path(predictions))
        .where((F.col("model_version") == model_version) & (F.col("attempts") < max_attempts)
               & (F.col("tagged_at") <= cutoff))
        .select("image_id")
    )


def _retryable(max_attempts: int) -> Column:
    return is_transient(F.col("status")) & (F.col("attempts") < max_attempts)


def add_failures(spark: SparkSession, predictions: str, scored: DataFrame, max_attempts: int) -> None:
    """Upsert the retryable rows of `scored` (RETRY columns); run before they reach predictions."""
    failed = scored.where(_retryable(max_attempts)).select(*RETRY.fieldNames())
    (
        DeltaTable.forPath(spark, retry_path(predictions)).alias("t")
        .merge(failed.alias("s"), _ON).whenMatchedUpdateAll().whenNotMatchedInsertAll().execute()
    )


def remove_resolved(spark: SparkSession, predictions: str, scored: DataFrame, max_attempts: int) -> None:
    """Delete the rows of `scored` that are not retryable; run after they reached predictions."""
    resolved = scored.where(~_retryable(max_attempts))
    (
        DeltaTable.forPath(spark, retry_path(predictions)).alias("t")
        .merge(resolved.select(*PREDICTION_KEYS).alias("s"), _ON).whenMatchedDelete().execute()
    )
