"""Table maintenance (jobs/maintain.py): OPTIMIZE ... ZORDER BY (image_id), REORG ... APPLY (PURGE)
and VACUUM on the predictions table and its retry table, recorded in the runs table."""

from __future__ import annotations

import logging
import time

from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from mumic_batch.config import JobCfg, MaintainCfg, to_dict
from mumic_batch.pipeline.runs import RunRecord, recorded
from mumic_batch.tables import retry
from mumic_batch.tables.io import TableError, ensure_predictions, qualified, table_exists

log = logging.getLogger(__name__)

JOB = "maintain"


def run(spark: SparkSession, cfg: JobCfg) -> dict:
    """Maintain tables.predictions and its retry table; return the run summary."""
    record = RunRecord(JOB, to_dict(cfg))
    return recorded(spark, record, cfg.tables.runs, lambda: _maintain(spark, cfg, record))


def _maintain(spark: SparkSession, cfg: JobCfg, record: RunRecord) -> dict:
    path = cfg.tables.predictions
    if not table_exists(spark, path):
        raise TableError(f"no predictions table at {path}: nothing to maintain (set tables.predictions)")
    ensure_predictions(spark, path)  # an older table gets deletion vectors before it is compacted
    record.model_version = cfg.maintain.model_version or None
    done = {"predictions": maintain_table(spark, path, cfg.maintain, record),
            "retry": maintain_table(spark, retry.retry_path(path), cfg.maintain, record, partitioned=False)}
    return {"job": JOB, "run_id": record.run_id, "predictions": path, "operations": done,
            "stage_seconds": record.stage_seconds}


def maintain_table(spark: SparkSession, path: str, m: MaintainCfg, record: RunRecord,
                   partitioned: bool = True) -> dict:
    """Run the configured operations on one Delta table; {operation: its operationMetrics}."""
    if not table_exists(spark, path):
        return {}
    where = ""
    if partitioned and m.model_version:
        where = " WHERE model_version = '{}'".format(m.model_version.replace("'", "''"))
    table = f"delta.`{qualified(path)}`"
    name = path.rstrip("/").rsplit("/", 1)[-1]
    out: dict[str, dict] = {}
    if m.optimize:
        zorder = " ZORDER BY (image_id)" if partitioned else ""
        out["optimize"] = _timed(spark, record, f"{name}:optimize", path, f"OPTIMIZE {table}{where}{zorder}")
    if m.purge_deletion_vectors:
        out["purge"] = _timed(spark, record, f"{name}:purge", path, f"REORG TABLE {table}{where} APPLY (PURGE)")
    if m.vacuum:
        out["vacuum"] = _timed(spark, record, f"{name}:vacuum", path, f"VACUUM {table} RETAIN {m.retain_hours:g} HOURS")
    return out


def _timed(spark: SparkSession, record: RunRecord, stage: str, path: str, sql: str) -> dict:
    log.info("%s", sql)
    started = time.perf_counter()
    spark.sql(sql).collect()
    record.stage_seconds[stage] = time.perf_counter() - started
    last = DeltaTable.forPath(spark, path).history(1).first()
    metrics = dict(last["operationMetrics"] or {})
    log.info("%s: %.1f s, %s %s", stage, record.stage_seconds[stage], last["operation"], metrics)
    return {"operation": last["operation"], **metrics}
