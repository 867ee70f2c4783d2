"""Which catalogue rows a tagging run processes: new, changed, or failed with attempts left.

Two ways to find new and changed rows:
- change_feed: when the catalogue is a Delta table with `delta.enableChangeDataFeed=true` and an
  earlier successful run of this model version recorded the catalogue version it read, only rows
  inserted or updated since that version are candidates (no full-catalogue join);
- anti_join: otherwise, the catalogue is joined with this version's predictions.
Both then keep a candidate only if it has no prediction, its uri or updated_at changed, or it
failed with a transient status, attempts left and the retry delay passed (so an immediate rerun of
the same night processes nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mumic_batch.config import TablesCfg, TagCfg
from mumic_batch.core import status as st
from mumic_batch.tables.io import resolve_format, table_exists

log = logging.getLogger(__name__)

FULL = "full"
ANTI_JOIN = "anti_join"
CHANGE_FEED = "change_feed"


@dataclass(frozen=True)
class Selection:
    """The rows to process and how they were found."""

    rows: DataFrame
    method: str
    source_version: int | None  # catalogue Delta version read by this run (None: not a Delta path)


def catalogue_version(spark: SparkSession, tables: TablesCfg) -> tuple[int | None, bool]:
    """(current Delta version, change data feed enabled) of the catalogue; (None, False) if not Delta."""
    if resolve_format(spark, tables.catalogue, tables.catalogue_format) != "delta":
        return None, False
    table = DeltaTable.forPath(spark, tables.catalogue)
    version = table.history(1).select("version").first()["version"]
    props = table.detail().select("properties").first()["properties"] or {}
    return int(version), props.get("delta.enableChangeDataFeed", "false").lower() == "true"


def last_source_version(spark: SparkSession, tables: TablesCfg, model_version: str) -> int | None:
    """The catalogue version read by the latest successful tagging run of this model version."""
    if not table_exists(spark, tables.runs):
        return None
    row = (
        spark.read.format("delta").load(tables.runs)
        .where((F.col("job") == "tag_images") & (F.col("outcome") == "succeeded")
               & (F.col("model_version") == model_version) & (F.col("source") == tables.catalogue))
        .agg(F.max("source_version").alias("v")).first()
    )
    return None if row is None or row["v"] is None else int(row["v"])


def select_work(spark: SparkSession, catalogue: DataFrame, tables: TablesCfg, tag: TagCfg, model_version: str,
                source: tuple[int | None, bool]) -> Selection:
    """Choose the rows this run processes; `source` is catalogue_version()'s answer for `catalogue`."""
    version, cdf = source
    if tag.full or not table_exists(spark, tables.predictions):
        return Selection(catalogue, FULL, version)
    done = _predictions(spark, tables, model_version)
    since = last_source_version(spark, tables, model_version) if cdf else None
    if since is not None and version is not None:
        candidates = _changed_since(spark, catalogue, tables, since, version, done)
        method = CHANGE_FEED
    else:
        candidates, method = catalogue, ANTI_JOIN
    return Selection(_needs_work(candidates, done, tag), method, version)


def _predictions(spark: SparkSession, tables: TablesCfg, model_version: str) -> DataFrame:
    return (
        spark.read.format("delta").load(tables.predictions)
        .where(F.col("model_version") == model_version)
        .select("image_id", F.col("uri").alias("p_uri"), F.col("source_updated_at").alias("p_updated"),
                F.col("status").alias("p_status"), F.col("attempts").alias("p_attempts"),
                F.col("tagged_at").alias("p_tagged_at"))
    )


def _changed_since(spark: SparkSession, catalogue: DataFrame, tables: TablesCfg, since: int, version: int,
                   done: DataFrame) -> DataFrame:
    """Catalogue rows touched after version `since`, plus rows whose prediction failed (retry candidates)."""
    if since >= version:
        changed_ids = spark.createDataFrame([], "image_id string")
    else:
        changes = (
            spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", since + 1).option("endingVersion", version).load(tables.catalogue)
            .where(F.col("_change_type").isin("insert", "update_postimage"))
        )
        changed_ids = _ids(changes).select("image_id").distinct()
    failed_ids = done.where(F.col("p_status") != st.OK).select("image_id")
    ids = changed_ids.unionByName(failed_ids).distinct()
    log.info("change feed: catalogue versions %d..%d", since + 1, version)
    return catalogue.join(ids, "image_id", "left_semi")


def _ids(changes: DataFrame) -> DataFrame:
    if "image_id" in changes.columns:
        return changes
    return changes.withColumn("image_id", F.substring(F.sha1(F.col("uri")), 1, 16))


def _needs_work(candidates: DataFrame, done: DataFrame, tag: TagCfg) -> DataFrame:
    joined = candidates.join(done, "image_id", "left")
    is_new = F.col("p_status").isNull()
    changed = ~F.col("uri").eqNullSafe(F.col("p_uri")) | ~F.col("source_updated_at").eqNullSafe(F.col("p_updated"))
    due = F.col("p_tagged_at") <= F.current_timestamp() - F.expr(f"INTERVAL {int(tag.retry_after_s)} SECONDS")
    retry = (
        F.col("p_status").isin(*st.TRANSIENT) | F.col("p_status").rlike(st.TRANSIENT_HTTP_PATTERN)
    ) & (F.col("p_attempts") < tag.max_attempts) & due
    return joined.where(is_new | changed | retry).select(*candidates.columns)
