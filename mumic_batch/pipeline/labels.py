"""The labels table on the driver: the rows of some splits as pandas, pinned to one Delta version.

Training, pretraining and evaluation read a labelled set small enough for the driver (thousands to tens
of thousands of rows). A Delta table is read at its current version, and that version goes into the
model manifest and the runs table, so a model can be traced to the exact rows it saw.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mumic_batch.config import ClassPromptCfg, TablesCfg, TrainCfg
from mumic_batch.core.metrics import majority_classes
from mumic_batch.core.sample import fine_tune_classes
from mumic_batch.tables.io import read_table, resolve_format

log = logging.getLogger(__name__)


@dataclass
class LabelsTable:
    """Rows of the requested splits and where they came from."""

    frame: pd.DataFrame  # image_id, uri, split and the requested columns (array columns as lists)
    table: str  # the tables.labels reference
    format: str  # delta | parquet | table
    version: int | None  # Delta version read (None for Parquet and non-Delta catalog tables)

    def ref(self, **extra: Any) -> dict[str, Any]:
        """Reference for a manifest's training_data or a report."""
        return {"table": self.table, "format": self.format, "delta_version": self.version, **extra}

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split, index reset."""
        return self.frame[self.frame["split"] == name].reset_index(drop=True)


def delta_version(spark: SparkSession, ref: str, fmt: str) -> int | None:
    """Current version of a Delta path or Delta catalog table; None for anything else."""
    if fmt == "delta":
        table = DeltaTable.forPath(spark, ref)
    elif fmt == "table" and DeltaTable.isDeltaTable(spark, ref):
        table = DeltaTable.forName(spark, ref)
    else:
        return None
    return int(table.history(1).select("version").first()["version"])


def read_labels(spark: SparkSession, tables: TablesCfg, splits: Sequence[str], columns: Sequence[str]) -> LabelsTable:
    """Rows of `splits` with image_id, uri, split and `columns` (array columns become Python lists)."""
    fmt = resolve_format(spark, tables.labels, tables.labels_format)
    version = delta_version(spark, tables.labels, fmt)
    if fmt == "table" and version is not None:
        df = spark.read.option("versionAsOf", version).table(tables.labels)
    else:
        df = read_table(spark, tables.labels, fmt, version=version)
    missing = sorted({"split", *columns} - set(df.columns))
    if missing:
        raise ValueError(f"labels table {tables.labels} lacks columns {missing} (it has {', '.join(df.columns)})")
    df = _with_uris(spark, df, tables).where(F.col("split").isin(list(splits)))
    frame = df.select("image_id", "uri", "split", *[c for c in columns if c not in ("image_id", "uri", "split")])
    pdf = frame.orderBy("split", "image_id").toPandas()
    for col, dtype in frame.dtypes:
        if dtype.startswith("array"):
            pdf[col] = pdf[col].map(lambda v: [] if v is None else list(v))
    log.info("labels %s (%s%s): %d rows in splits %s", tables.labels, fmt,
             "" if version is None else f" v{version}", len(pdf), list(splits))
    return LabelsTable(pdf, tables.labels, fmt, version)


def _with_uris(spark: SparkSession, df: DataFrame, tables: TablesCfg) -> DataFrame:
    """Labels keyed by image id only get their URI from the catalogue; keyed by URI only, their id from it."""
    if "uri" not in df.columns:
        if "image_id" not in df.columns:
            raise ValueError(f"labels table {tables.labels} needs an image_id or a uri column")
        catalogue = read_table(spark, tables.catalogue, tables.catalogue_format).select("image_id", "uri")
        df = df.join(catalogue.dropDuplicates(["image_id"]), "image_id", "inner")
    if "image_id" not in df.columns:
        # Same rule as mumic_batch.core.ids.image_id_for: first 16 hex chars of sha1(uri).
        df = df.withColumn("image_id", F.substring(F.sha1(F.col("uri")), 1, 16))
    return df


def training_classes(cfg: TrainCfg) -> tuple[ClassPromptCfg, ...]:
    """train.classes, or the sample catalogue's fine-tuning classes (holdouts excluded) when none are listed."""
    if cfg.classes:
        return cfg.classes
    return tuple(ClassPromptCfg(c.name, c.prompt) for c in fine_tune_classes())


def multi_hot(label_lists: Sequence[Sequence[str]], class_names: Sequence[str]) -> np.ndarray:
    """[N, C] float32 with 1 where row i lists class j; names outside `class_names` are ignored."""
    index = {name: j for j, name in enumerate(class_names)}
    out = np.zeros((len(label_lists), len(class_names)), dtype=np.float32)
    for i, labels in enumerate(label_lists):
        for name in labels:
            j = index.get(name)
            if j is not None:
                out[i, j] = 1.0
    return out


def map_class_indices(y_true: np.ndarray, class_names: Sequence[str], explicit: Sequence[str], majority: int) -> list[int]:
    """Columns of the macro mAP: the `explicit` class names present, else the `majority` best-supported ones."""
    if explicit:
        return [j for j, name in enumerate(class_names) if name in set(explicit)]
    return majority_classes(y_true, majority)
