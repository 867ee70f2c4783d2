"""Outputs named as catalog tables (`db.table`): the job creates the database, the Delta tables (same
schemas, partitioning and properties as path tables) and the persistent `label_probs` view, then
works on each table's location like on any path table."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from pyspark.sql import SparkSession

from mumic_batch.config import TablesCfg
from mumic_batch.sql.views import LABEL_PROBS_SPARK, is_catalog_name
from mumic_batch.tables.io import TableError, ensure_delta, ensure_predictions
from mumic_batch.tables.schemas import METRICS, RUNS

log = logging.getLogger(__name__)

OUTPUTS = ("predictions", "runs", "metrics")
INPUTS = ("catalogue", "labels")


def names_catalog_tables(tables: TablesCfg) -> bool:
    """True when a job on `tables` needs a catalog: a table named db.table, or an input given as a
    catalog table (format `table`, or `auto` with a bare name that is no existing path)."""
    if any(is_catalog_name(getattr(tables, key)) for key in (*OUTPUTS, *INPUTS)):
        return True
    return any(_input_table(getattr(tables, key), getattr(tables, f"{key}_format")) for key in INPUTS)


def _input_table(ref: str, fmt: str) -> bool:
    return fmt == "table" or (fmt == "auto" and "://" not in ref and "/" not in ref and not Path(ref).exists())


def resolve_outputs(spark: SparkSession, tables: TablesCfg, persistent: bool) -> TablesCfg:
    """`tables` with every output given as a catalog name created if needed and replaced by its location.

    `persistent`: the catalog keeps tables after the job (a metastore); an in-memory catalog would
    forget them, and the next job could not re-create them over the files left behind.
    """
    names = {key: getattr(tables, key) for key in OUTPUTS if is_catalog_name(getattr(tables, key))}
    if not names:
        return tables
    if not persistent:
        raise TableError(
            f"{', '.join(f'tables.{k}={v}' for k, v in names.items())}: catalog names need a catalog that keeps "
            "them: set spark.metastore (a local Derby metastore, e.g. data/metastore_db) or run under "
            "spark-submit with the cluster's metastore (docs/tables.md, 'Catalog tables')")
    locations = {key: ensure_output(spark, key, name) for key, name in names.items()}
    if "predictions" in names:
        create_label_probs(spark, names["predictions"])
    return dataclasses.replace(tables, **locations)


def ensure_output(spark: SparkSession, key: str, name: str) -> str:
    """Create the database and the table `name` if absent; return the table's location."""
    database = name.rsplit(".", 1)[0]
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {database}")
    if key == "predictions":
        table = ensure_predictions(spark, name)
    else:
        table = ensure_delta(spark, name, RUNS if key == "runs" else METRICS)
    location = local_path(table.detail().select("location").first()["location"])
    log.info("catalog table %s (%s) is at %s", name, key, location)
    return location


def create_label_probs(spark: SparkSession, predictions: str) -> str:
    """The persistent `label_probs` view beside the predictions table; returns its name."""
    view = f"{predictions.rsplit('.', 1)[0]}.label_probs"
    spark.sql(f"CREATE OR REPLACE VIEW {view} AS {LABEL_PROBS_SPARK.format(predictions=predictions)}")
    return view


def local_path(location: str) -> str:
    """A catalog location as the path the other table helpers take: file:/x and file:///x become /x."""
    match = re.match(r"^file:(?://)?(/.*)$", location)
    return match.group(1) if match else location
