"""Which catalogue rows a tagging run processes: new, changed, or failed with attempts left.

Two ways to find new and changed rows:
- change_feed: when the catalogue is a Delta table with `delta.enableChangeDataFeed=true` and an
  earlier successful run of this model version recorded the catalogue version it read, the
  candidates are the ids inserted or updated since that version plus the due rows of the retry
  table (tables/retry.py). Only the candidates' catalogue rows are de-duplicated and only their
  predictions are joined; a night with no candidates reads neither table.
- anti_join: otherwise (Parquet catalogues, first runs of a version), the whole catalogue is
  de-duplicated and joined with this version's predictions.
Both then keep a candidate only if it has no prediction, its uri or updated_at changed, or it
failed with a transient status, attempts left and the retry delay passed (so an immediate rerun of
the same night processes nothing).

Every selected row carries `prior_attempts`: null when the row has no prediction yet (the commit
appends it), 0 when its input changed, else the prediction's attempts (the commit MERGEs it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from mumic_batch.config import TablesCfg, TagCfg
from mumic_batch.tables import retry
from mumic_batch.tables.io import TableError, read_table, resolve_format, table_exists

log = logging.getLogger(__name__)

FULL = "full"
ANTI_JOIN = "anti_join"
CHANGE_FEED = "change_feed"

# Up to this many candidate ids are broadcast to the catalogue and predictions scans (no shuffle of
# either table); more (a rewritten catalogue) are shuffle-joined.
BROADCAST_IDS = 2_000_000


@dataclass(frozen=True)
class Selection:
    """The rows to process (image_id, uri, source_updated_at, prior_attempts) and how they were found."""

    rows: DataFrame | None  # None: nothing can need work (no candidate ids), so nothing was read
    method: str
    source_version: int | None  # catalogue Delta version read by this run (None: not a Delta path)
    counted: int | None  # catalogue rows from Delta statistics (None: not a Delta table)
    observed: Observation | None = None  # else counts the catalogue rows as the worklist is written
    # Known without a count: False, no selected row has a prediction (all are appended); True, every
    # one does (all are MERGEd); None, count the rows with prior_attempts.
    has_prior: bool | None = None

    def input_rows(self) -> int | None:
        """Catalogue rows read (duplicates included); call after the worklist was written."""
        if self.counted is not None or self.observed is None:
            return self.counted
        return int(self.observed.get["rows"])


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


def normalised(df: DataFrame) -> DataFrame:
    """image_id (derived from the URI when absent), uri and source_updated_at of every catalogue row."""
    if "uri" not in df.columns:
        raise TableError(f"catalogue has no 'uri' column (columns: {', '.join(df.columns)})")
    uri_type = dict(df.dtypes)["uri"]
    if uri_type != "string":
        # A cast would turn numbers into relative paths and every row into blocked_path or not_found.
        raise TableError(f"catalogue column 'uri' has type {uri_type}, not string: it must hold image URIs "
                         "(s3://..., https://... or file paths); fix the catalogue table or point "
                         "tables.catalogue at the right one")
    if "image_id" not in df.columns:
        # Same rule as mumic_batch.core.ids.image_id_for: first 16 hex chars of sha1(uri).
        df = df.withColumn("image_id", F.substring(F.sha1(F.col("uri")), 1, 16))
    updated = F.col("updated_at").cast("timestamp") if "updated_at" in df.columns else F.lit(None).cast("timestamp")
    return df.select(F.col("image_id").cast("string"), F.col("uri").cast("string"), updated.alias("source_updated_at"))


def latest(df: DataFrame) -> DataFrame:
    """One row per image_id: the latest updated_at (then the smallest uri)."""
    order = Window.partitionBy("image_id").orderBy(F.col("source_updated_at").desc_nulls_last(), F.col("uri"))
    return df.withColumn("_n", F.row_number().over(order)).where("_n = 1").drop("_n")


def select_work(spark: SparkSession, tables: TablesCfg, tag: TagCfg, model_version: str,
                source: tuple[int | None, bool]) -> Selection:
    """Choose the rows this run processes; `source` is catalogue_version()'s answer for the catalogue."""
    version, cdf = source
    counted = _delta_rows(spark, tables.catalogue, version) if version is not None else None
    raw = normalised(read_table(spark, tables.catalogue, tables.catalogue_format, version))
    observed = None
    if counted is None:
        # Parquet and catalog tables are always read whole (anti-join), so count them in that pass.
        observed = Observation("catalogue")
        raw = raw.observe(observed, F.count(F.lit(1)).alias("rows"))
    if not table_exists(spark, tables.predictions):
        rows = latest(raw).withColumn("prior_attempts", F.lit(None).cast("int"))
        return Selection(rows, FULL, version, counted, observed, has_prior=False)
    if tag.full:
        # Every row goes through the MERGE (which counts attempts), whether or not it has a prediction.
        return Selection(latest(raw).withColumn("prior_attempts", F.lit(0)), FULL, version, counted, observed,
                         has_prior=True)
    since = last_source_version(spark, tables, model_version) if cdf else None
    if since is not None and version is not None:
        ids = _candidate_ids(spark, tables, tag, model_version, since, version)
        n = ids.count()
        log.info("change feed: catalogue versions %d..%d, %d candidate ids", since + 1, version, n)
        if n == 0:
            return Selection(None, CHANGE_FEED, version, counted)
        ids = F.broadcast(ids) if n <= BROADCAST_IDS else ids
        candidates = latest(raw.join(ids, "image_id", "left_semi"))
        done = _predictions(spark, tables, model_version).join(ids, "image_id", "left_semi")
        return Selection(_needs_work(candidates, done, tag), CHANGE_FEED, version, counted)
    done = _predictions(spark, tables, model_version)
    return Selection(_needs_work(latest(raw), done, tag), ANTI_JOIN, version, counted, observed)


def _delta_rows(spark: SparkSession, path: str, version: int) -> int:
    """Rows of a Delta table version from its file statistics (Delta answers count(*) from the log)."""
    return spark.read.format("delta").option("versionAsOf", version).load(path).count()


def _candidate_ids(spark: SparkSession, tables: TablesCfg, tag: TagCfg, model_version: str, since: int,
                   version: int) -> DataFrame:
    """Distinct ids inserted or updated in catalogue versions since+1..version, plus due retries."""
    due = retry.due(spark, tables.predictions, model_version, tag.retry_after_s, tag.max_attempts)
    if since >= version:
        return due.distinct()
    changes = (
        spark.read.format("delta").option("readChangeFeed", "true")
        .option("startingVersion", since + 1).option("endingVersion", version).load(tables.catalogue)
        .where(F.col("_change_type").isin("insert", "update_postimage"))
    )
    return normalised(changes).select("image_id").unionByName(due).distinct()


def _predictions(spark: SparkSession, tables: TablesCfg, model_version: str) -> DataFrame:
    return (
        spark.read.format("delta").load(tables.predictions)
        .where(F.col("model_version") == model_version)
        .select("image_id", F.col("uri").alias("p_uri"), F.col("source_updated_at").alias("p_updated"),
                F.col("status").alias("p_status"), F.col("attempts").alias("p_attempts"),
                F.col("tagged_at").alias("p_tagged_at"))
    )


def _needs_work(candidates: DataFrame, done: DataFrame, tag: TagCfg) -> DataFrame:
    joined = candidates.join(done, "image_id", "left")
    is_new = F.col("p_status").isNull()
    changed = ~F.col("uri").eqNullSafe(F.col("p_uri")) | ~F.col("source_updated_at").eqNullSafe(F.col("p_updated"))
    due = F.col("p_tagged_at") <= F.current_timestamp() - F.expr(f"INTERVAL {int(tag.retry_after_s)} SECONDS")
    again = retry.is_transient(F.col("p_status")) & (F.col("p_attempts") < tag.max_attempts) & due
    prior: Column = F.when(is_new, F.lit(None)).when(changed, F.lit(0)).otherwise(F.col("p_attempts"))
    return joined.where(is_new | changed | again).select(*candidates.columns, prior.cast("int").alias("prior_attempts"))
