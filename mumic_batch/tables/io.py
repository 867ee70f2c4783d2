"""Reading input tables and writing Delta outputs (keyed MERGE, idempotent appends)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mumic_batch.sql.views import is_catalog_name
from mumic_batch.tables.schemas import PREDICTION_KEYS, PREDICTIONS, PREDICTIONS_PARTITION, PREDICTIONS_PROPERTIES

log = logging.getLogger(__name__)


class TableError(ValueError):
    """An input table is missing or unreadable, named with the fix."""


def resolve_format(spark: SparkSession, ref: str, fmt: str) -> str:
    """Turn `auto` into delta, parquet or table by looking at the reference."""
    if fmt != "auto":
        return fmt
    if "://" in ref and not ref.startswith("file://"):
        return "delta" if DeltaTable.isDeltaTable(spark, ref) else "parquet"
    path = Path(ref.removeprefix("file://"))
    if (path / "_delta_log").is_dir():
        return "delta"
    if path.exists():
        return "parquet"
    if "/" not in ref and spark.catalog.tableExists(ref):
        return "table"
    raise TableError(
        f"table '{ref}' not found: give an existing Delta or Parquet path, or a catalog table name "
        "(set tables.*_format to delta, parquet or table to skip detection)"
    )


def read_table(spark: SparkSession, ref: str, fmt: str = "auto", version: int | None = None) -> DataFrame:
    """Read a Delta path (at `version` when given), Parquet path or catalog table."""
    resolved = resolve_format(spark, ref, fmt)
    log.info("reading %s table %s%s", resolved, ref, "" if version is None else f" at version {version}")
    if resolved == "table":
        return spark.table(ref)
    reader = spark.read.format(resolved)
    if version is not None and resolved == "delta":
        reader = reader.option("versionAsOf", version)
    return reader.load(ref)


def write_table(df: DataFrame, path: str, fmt: str = "delta", mode: str = "overwrite") -> None:
    """Write a whole table (used for generated inputs such as the sample catalogue)."""
    writer = df.write.format(fmt).mode(mode)
    if fmt == "delta":
        writer = writer.option("overwriteSchema", "true")
    writer.save(path)


def qualified(path: str) -> str:
    """Local paths made absolute (Delta's table builder refuses relative locations); URIs unchanged."""
    return path if "://" in path else str(Path(path).resolve())


def sql_name(ref: str) -> str:
    """How SQL names the Delta table `ref`: a catalog name as is, a path as delta.`path`."""
    return ref if is_catalog_name(ref) else f"delta.`{qualified(ref)}`"


# Delta's errors for a table creation that raced another writer's: its first commit came first
# (a conflict), or is being written (the DynamoDB LogStore writes it to _delta_log/.tmp/ first, and
# meanwhile the location holds a log without a table).
CREATION_RACE = ("DELTA_PROTOCOL_CHANGED", "DELTA_METADATA_CHANGED", "DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION",
                 "DELTA_TABLE_NOT_FOUND")
CREATE_ATTEMPTS = 5


def ensure_delta(spark: SparkSession, ref: str, schema, partition_by: tuple[str, ...] = (),
                 properties: dict[str, str] | None = None) -> DeltaTable:
    """Create an empty Delta table with `schema` if none exists at `ref` (a path, or a catalog name: a
    table in the catalog, its files where the catalog puts them).

    Two runs that start together on a new table (two model versions, or a run and an evaluation
    appending to runs) both try to create it; the one that loses waits for the winner's table and uses it.
    """
    builder = DeltaTable.createIfNotExists(spark)
    builder = builder.tableName(ref) if is_catalog_name(ref) else builder.location(qualified(ref))
    builder = builder.addColumns(schema)
    if partition_by:
        builder = builder.partitionedBy(*partition_by)
    for key, value in (properties or {}).items():
        builder = builder.property(key, value)
    attempt = 1
    while True:
        try:
            return builder.execute()
        except Exception as err:
            race = [name for name in CREATION_RACE if name in str(err)]
            if attempt == CREATE_ATTEMPTS or not race:
                raise
            # Once the winner's commit is there, creating "if not exists" returns its table.
            log.info("table %s is being created by a concurrent writer (%s): trying again", ref, race[0])
            time.sleep(attempt)
            attempt += 1


def ensure_predictions(spark: SparkSession, ref: str) -> DeltaTable:
    """The predictions table (path or catalog name), created if absent, with PREDICTIONS_PROPERTIES set
    (older tables in place)."""
    table = ensure_delta(spark, ref, PREDICTIONS, (PREDICTIONS_PARTITION,), PREDICTIONS_PROPERTIES)
    props = table.detail().select("properties").first()["properties"] or {}
    missing = {k: v for k, v in PREDICTIONS_PROPERTIES.items() if props.get(k) != v}
    if missing:
        # Enabling deletion vectors upgrades the protocol (reader 3 / writer 7): docs/tables.md lists the
        # outside readers that still read the table afterwards.
        log.warning("upgrading predictions table %s in place: setting %s", ref, missing)
        settings = ", ".join(f"'{k}' = '{v}'" for k, v in missing.items())
        spark.sql(f"ALTER TABLE {sql_name(ref)} SET TBLPROPERTIES ({settings})")
    return table


def append_predictions(spark: SparkSession, source: DataFrame, path: str, app_id: str, txn_version: int) -> bool:
    """Append rows whose keys are not in the table yet, at most once per (app_id, txn_version).

    Delta records the pair in the commit and skips a later write with the same pair, so a replayed
    chunk (a retried commit, a resumed driver loop) adds nothing. Returns False when it was skipped.
    """
    before = DeltaTable.forPath(spark, path).history(1).select("version").first()["version"]
    (
        source.select(*[f.name for f in PREDICTIONS.fields]).write.format("delta").mode("append")
        .option("txnAppId", app_id).option("txnVersion", txn_version).save(path)
    )
    after = DeltaTable.forPath(spark, path).history(1).select("version").first()["version"]
    if after == before:
        log.info("append %s/%d is already in %s: skipped", app_id, txn_version, path)
    return after != before


def merge_predictions(spark: SparkSession, source: DataFrame, path: str, model_version: str) -> None:
    """Upsert prediction rows keyed by (image_id, model_version) into ensure_predictions' table; a rerun
    adds no rows."""
    target = DeltaTable.forPath(spark, path)
    # The literal partition predicate keeps the MERGE from reading (and conflicting on) other versions.
    version = model_version.replace("'", "''")
    keys = " AND ".join(f"t.{k} = s.{k}" for k in PREDICTION_KEYS)
    condition = f"t.{PREDICTIONS_PARTITION} = '{version}' AND {keys}"
    columns = [f.name for f in PREDICTIONS.fields]
    values = {c: f"s.{c}" for c in columns}
    updates = dict(values)
    # attempts counts runs on the same input (same uri and updated_at); a changed input starts over.
    updates["attempts"] = (
        "CASE WHEN t.uri <=> s.uri AND t.source_updated_at <=> s.source_updated_at "
        "THEN t.attempts + 1 ELSE 1 END"
    )
    (
        target.alias("t")
        .merge(source.select(*columns).alias("s"), condition)
        .whenMatchedUpdate(set=updates)
        .whenNotMatchedInsert(values=values)
        .execute()
    )


def merge_zero_shot(spark: SparkSession, source: DataFrame, path: str, model_version: str,
                    names: tuple[str, ...]) -> dict[str, str]:
    """Merge newly scored zero-shot classes (ZERO_SHOT_SCORES rows) into a model version's rows.

    Keyed by (image_id, model_version) and guarded by run_id: a row re-tagged after `source` was
    read has another run_id and keeps what its tagging stored. In a matched row the classes `names`
    are replaced (added when new) and its other zero-shot classes kept, first, in their order; a
    source row with null scores (no embedding: a failed image) is written back unchanged, so that
    every old file of the partition is removed whole instead of left behind with a deletion vector.
    Returns the MERGE's operation metrics.
    """
    target = DeltaTable.forPath(spark, path)
    version = model_version.replace("'", "''")
    condition = f"t.{PREDICTIONS_PARTITION} = '{version}' AND t.image_id = s.image_id AND t.run_id = s.run_id"
    scored = F.array(*[F.lit(n) for n in names])
    kept_probs = F.map_filter(F.col("t.zero_shot_probs"), lambda k, _: ~F.array_contains(scored, k))
    kept_labels = F.filter(F.col("t.zero_shot_labels"), lambda x: ~F.array_contains(scored, x))
    no_scores = F.col("s.zero_shot_probs").isNull()
    updates = {
        "zero_shot_probs": F.when(no_scores, F.col("t.zero_shot_probs"))
        .otherwise(F.map_concat(F.coalesce(kept_probs, F.create_map().cast("map<string,float>")),
                                F.col("s.zero_shot_probs"))),
        "zero_shot_labels": F.when(no_scores, F.col("t.zero_shot_labels"))
        .otherwise(F.concat(F.coalesce(kept_labels, F.array().cast("array<string>")), F.col("s.zero_shot_labels"))),
    }
    target.alias("t").merge(source.alias("s"), condition).whenMatchedUpdate(set=updates).execute()
    return dict(target.history(1).first()["operationMetrics"] or {})


def append_rows(spark: SparkSession, rows: list[tuple], schema, path: str) -> None:
    """Append a few driver-side rows (runs, metrics) to a Delta table, creating it if needed.

    Columns added to `schema` in a later release are added to an existing table (mergeSchema).
    """
    ensure_delta(spark, path, schema)
    spark.createDataFrame(rows, schema).write.format("delta").mode("append").option("mergeSchema", "true").save(path)


def table_exists(spark: SparkSession, path: str) -> bool:
    """True when `path` holds a Delta table."""
    return DeltaTable.isDeltaTable(spark, path)


def list_dir(spark: SparkSession, path: str) -> list[str]:
    """Names of the entries directly under `path` on any Hadoop filesystem ([] when it is absent)."""
    fs, hpath = _filesystem(spark, path)
    if not fs.exists(hpath):
        return []
    return sorted(status.getPath().getName() for status in fs.listStatus(hpath))


def delete_path(spark: SparkSession, path: str) -> None:
    """Recursively delete a path on any Hadoop filesystem (local, s3a, ...)."""
    fs, hpath = _filesystem(spark, path)
    fs.delete(hpath, True)


def staging_root(predictions: str) -> str:
    """Where runs stage their intermediate tables beside predictions (one directory per run id)."""
    return f"{predictions.rstrip('/')}__staging"


def delete_if_empty(spark: SparkSession, path: str) -> None:
    """Delete a directory that holds nothing (a no-op when absent or not empty)."""
    fs, hpath = _filesystem(spark, path)
    if fs.exists(hpath) and not list(fs.listStatus(hpath)):
        fs.delete(hpath, False)


def _filesystem(spark: SparkSession, path: str):
    hpath = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath
