"""Build the SparkSession (local by default, or whatever spark-submit provides) with Delta enabled."""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pyspark.sql import SparkSession

from mumic_batch.config import SparkCfg

log = logging.getLogger(__name__)

DELTA_SETTINGS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def under_spark_submit() -> bool:
    """True when spark-submit launched this driver (it then owns master, jars and memory)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def session_settings(cfg: SparkCfg, submitted: bool, catalog: bool = True) -> dict[str, str]:
    """All Spark settings this project sets, from config; `catalog`: the job names catalog tables."""
    settings = dict(DELTA_SETTINGS)
    settings.update({
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch_rows),
        "spark.sql.execution.arrow.maxBytesPerBatch": str(cfg.arrow_batch_bytes),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",  # keeps the per-worker model cache alive across tasks
        "spark.python.worker.faulthandler.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
    })
    if not submitted:
        settings["spark.master"] = cfg.master
        settings["spark.driver.memory"] = cfg.driver_memory
        settings["spark.jars.packages"] = ",".join((cfg.delta_package, *cfg.packages))
        settings["spark.ui.showConsoleProgress"] = "false"
        settings.update(catalog_settings(cfg, catalog))
    settings.update(cfg.conf)
    return settings


def catalog_settings(cfg: SparkCfg, catalog: bool = True) -> dict[str, str]:
    """Local runs: a Derby metastore (Hive catalog; pyspark's wheel ships Hive and Derby) under
    spark.metastore when the job names catalog tables, so that they outlive the job; the warehouse
    where their files live; the driver's JVM options. Under spark-submit the cluster's own catalog
    settings apply instead.

    A job on paths only keeps Spark's in-memory catalog: booting Derby and the Hive client costs it
    seconds (about 20 s for a new metastore), and Derby lets one process at a time open it.
    """
    settings = {}
    java = [cfg.driver_java_options] if cfg.driver_java_options else []
    if cfg.warehouse:
        settings["spark.sql.warehouse.dir"] = str(Path(cfg.warehouse).resolve())
    if cfg.metastore and catalog:
        metastore = Path(cfg.metastore).resolve()
        settings["spark.sql.catalogImplementation"] = "hive"
        settings["spark.hadoop.javax.jdo.option.ConnectionURL"] = f"jdbc:derby:;databaseName={metastore};create=true"
        # Derby's log beside its database, not in whatever directory the job was started from.
        java.append(f"-Dderby.stream.error.file={metastore.parent / 'derby.log'}")
    if java:
        settings["spark.driver.extraJavaOptions"] = " ".join(java)
    return settings


def persistent_catalog(cfg: SparkCfg) -> bool:
    """True when catalog tables outlive the job: a local Derby metastore, or the cluster's catalog."""
    return bool(cfg.metastore) or under_spark_submit()


def build_session(cfg: SparkCfg, job: str, catalog: bool = True) -> SparkSession:
    """Create (or join) the SparkSession for `job`; `catalog`: it may name catalog tables (db.table)."""
    submitted = under_spark_submit()
    if not submitted:
        # Executors must run the same interpreter (and venv) as the driver in local mode.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(f"{cfg.app_name}:{job}")
    for key, value in session_settings(cfg, submitted, catalog).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("spark session ready: master=%s version=%s", spark.sparkContext.master, spark.version)
    _log_local_attempts(spark.sparkContext.master)
    return spark


def local_task_attempts(master: str) -> int | None:
    """Attempts per task of a local master (local[N] and local[*]: 1, local[N,M]: M); None if not local."""
    if master == "local":
        return 1
    found = re.fullmatch(r"local\[(?:\d+|\*)(?:,\s*(\d+))?\]", master)
    if found is None:
        return None
    return int(found.group(1)) if found.group(1) else 1


def _log_local_attempts(master: str) -> None:
    attempts = local_task_attempts(master)
    if attempts is None:
        return
    if attempts > 1:
        log.info("local mode %s: each task is tried up to %d times, so a crashed Python worker (an OOM "
                 "kill) is retried, as on a cluster", master, attempts)
    else:
        log.warning("local mode %s tries each task once: one crashed Python worker (an OOM kill) fails the "
                    "whole run; use local[N,4] (spark.master) to retry failed tasks", master)


@contextmanager
def owned_session(cfg: SparkCfg, job: str, catalog: bool = True) -> Iterator[SparkSession]:
    """A session for one job run; stopped afterwards only if this call created it."""
    existing = SparkSession.getActiveSession()
    spark = existing or build_session(cfg, job, catalog)
    try:
        yield spark
    finally:
        if existing is None:
            spark.stop()
