"""Write the local driver JVM's class archive (spark/class_archive.py).

A driver JVM that dumps its loaded classes when it exits runs one of each kind of Spark and Delta
operation a tagging run makes, with the project's own table code on scratch tables: a Delta
catalogue and its version, the lease (create, read, MERGE, DELETE), the retry and predictions
tables, the selection, a Python Arrow stage, a locally checkpointed worklist, an append with a
transaction id and a MERGE into predictions. The archive is written beside its final name and
renamed into place, so a concurrent local run sees either no archive or a whole one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from mumic_batch.config import ConfigError, JobCfg, TablesCfg, TagCfg
from mumic_batch.pipeline.selection import catalogue_version, select_work
from mumic_batch.spark.class_archive import (
    archive_path,
    class_path_blocker,
    dump_log,
    dump_options,
    stop_and_exit_jvm,
)
from mumic_batch.spark.session import build_session, under_spark_submit
from mumic_batch.tables import retry
from mumic_batch.tables.io import append_predictions, ensure_predictions, merge_predictions, write_table
from mumic_batch.tables.lease import Lease
from mumic_batch.tables.schemas import PREDICTIONS

log = logging.getLogger(__name__)

JOB = "jvm_archive"
_VERSION = "jvm-archive"


def run(cfg: JobCfg, force: bool = False) -> dict:
    """Write the archive for cfg.spark unless it exists (or `force`); the summary of what was done."""
    path = _target(cfg)
    if path.is_file() and not force:
        log.info("class archive %s exists for this JDK, Spark and driver options: nothing to do", path)
        return {"job": JOB, "archive": str(path), "written": False, "bytes": path.stat().st_size}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    started = time.perf_counter()
    log.info("writing the class archive %s: a driver JVM runs the jobs' Spark and Delta operations on scratch "
             "tables and dumps its classes when it exits (about a minute)", path)
    try:
        _run_and_dump(cfg, tmp)
    except Exception:
        tmp.unlink(missing_ok=True)  # a JVM that failed part way may still have dumped what it had loaded
        raise
    classes = _archived_classes(dump_log(tmp))
    os.replace(tmp, path)
    dump_log(tmp).unlink()
    seconds = time.perf_counter() - started
    log.info("class archive %s written: %d classes, %.0f MiB in %.0f s", path, classes, path.stat().st_size / 2**20,
             seconds)
    return {"job": JOB, "archive": str(path), "written": True, "classes": classes, "bytes": path.stat().st_size,
            "seconds": round(seconds, 1)}


def _target(cfg: JobCfg) -> Path:
    path = archive_path(cfg.spark)
    if path is None:
        raise ConfigError("spark.class_archive is empty: set it to the directory that keeps the archive "
                          "(conf/local.yaml: ~/.cache/mumic-batch/jvm)")
    if under_spark_submit():
        raise ConfigError("jobs.jvm_archive is for local runs: under spark-submit the cluster starts the driver's "
                          "JVM; run it with plain python")
    blocker = class_path_blocker()
    if blocker:
        raise ConfigError(f"cannot write a class archive: {blocker}")
    if SparkSession.getActiveSession() is not None:
        raise ConfigError("jobs.jvm_archive needs a driver JVM of its own: this process already has a Spark session")
    return path


def _run_and_dump(cfg: JobCfg, tmp: Path) -> None:
    options = " ".join([*dump_options(tmp), cfg.spark.driver_java_options]).strip()
    spark_cfg = dataclasses.replace(cfg.spark, class_archive="", driver_java_options=options)
    spark = build_session(spark_cfg, JOB, catalog=False)
    try:
        with tempfile.TemporaryDirectory(prefix="mumic-jvm-archive-") as scratch:
            _exercise(spark, scratch)
    finally:
        stop_and_exit_jvm(spark)
    if not tmp.is_file():
        raise RuntimeError(f"the driver JVM exited without writing {tmp}; its class-data log is {dump_log(tmp)}")


def _exercise(spark: SparkSession, root: str) -> None:
    tables = TablesCfg(catalogue=f"{root}/catalogue", catalogue_format="delta", predictions=f"{root}/predictions",
                       runs=f"{root}/runs", metrics=f"{root}/metrics")
    catalogue = spark.range(64).select(
        F.format_string("img-%03d", "id").alias("image_id"),
        F.format_string("file:///images/%03d.jpg", "id").alias("uri"),
        F.current_timestamp().alias("updated_at"))
    write_table(catalogue, tables.catalogue)
    with Lease(spark, tables.predictions, _VERSION, "jvm-archive", lease_s=600) as lease:
        source = catalogue_version(spark, tables)
        retry.ensure_retry(spark, tables.predictions)
        selection = select_work(spark, tables, TagCfg(), _VERSION, source)
        ensure_predictions(spark, tables.predictions)
        worklist = selection.rows.mapInArrow(_passthrough, selection.rows.schema).localCheckpoint()
        log.info("class archive: %d worklist rows through a Python stage", worklist.count())
        lease.check()
        empty = spark.createDataFrame([], PREDICTIONS)
        append_predictions(spark, empty, tables.predictions, "jvm-archive", 0)
        merge_predictions(spark, empty, tables.predictions, _VERSION)


def _passthrough(batches):
    yield from batches


def _archived_classes(cds_log: Path) -> int:
    found = re.findall(r"Number of classes (\d+)", cds_log.read_text()) if cds_log.is_file() else []
    return int(found[-1]) if found else 0
