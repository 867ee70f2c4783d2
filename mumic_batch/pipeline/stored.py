"""A model version's stored rows (jobs/add_labels.py, jobs/search.py): read at one pinned table
version, and checked to come from the artifact whose text tower will score them."""

from __future__ import annotations

from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mumic_batch.core import status as st
from mumic_batch.tables.io import TableError, table_exists


@dataclass
class StoredRows:
    """The rows of one model version in the predictions table at `table_version`."""

    rows: DataFrame
    table_version: int
    status_counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.status_counts.values())

    @property
    def ok(self) -> int:
        return self.status_counts.get(st.OK, 0)


def stored_rows(spark: SparkSession, path: str, manifest) -> StoredRows:
    """The version's rows at the table's current version; fails when it has no ok row, or when they were
    tagged by other weights than the artifact's (their embeddings live in another space)."""
    if not table_exists(spark, path):
        raise TableError(f"no predictions table at {path}: tag a model version first (jobs/tag_images.py)")
    version = int(DeltaTable.forPath(spark, path).history(1).first()["version"])
    rows = (spark.read.format("delta").option("versionAsOf", version).load(path)
            .where(F.col("model_version") == manifest.version))
    counts = rows.groupBy("status").agg(F.count(F.lit(1)).alias("n"),
                                        F.collect_set("model_sha256").alias("sha")).collect()
    stored = StoredRows(rows, version, {r["status"]: int(r["n"]) for r in counts})
    if not stored.ok:
        raise ValueError(f"no ok rows of model version {manifest.version} in {path}: tag it first")
    foreign = sorted({s for r in counts for s in r["sha"]} - {manifest.weights_sha256})
    if foreign:
        raise ValueError(f"rows of {manifest.version} were tagged by weights {foreign}, not by the artifact's "
                         f"{manifest.weights_sha256}: their embeddings cannot be scored with this text tower")
    return stored
