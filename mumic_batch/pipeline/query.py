"""The Spark engine for SQL over the project's tables: each table registered as a temp view under a fixed name."""

from __future__ import annotations

import logging

import pyarrow as pa
from pyspark.errors import AnalysisException
from pyspark.sql import SparkSession

from mumic_batch.config import TablesCfg
from mumic_batch.sql.views import LABEL_PROBS_SPARK, table_refs
from mumic_batch.tables.io import read_table

log = logging.getLogger(__name__)

JOB = "query"


def register_views(spark: SparkSession, tables: TablesCfg) -> list[str]:
    """Register every table that exists (path or catalog name) as a temp view; return the view names."""
    views = []
    for name, (ref, fmt) in table_refs(tables).items():
        try:
            read_table(spark, ref, fmt).createOrReplaceTempView(name)
        except Exception as err:  # noqa: BLE001 - a table not written yet simply has no view
            log.info("no view %s: %s", name, str(err).splitlines()[0])
            continue
        views.append(name)
    if "predictions" in views:
        spark.sql(LABEL_PROBS_SPARK.format(predictions="predictions")).createOrReplaceTempView("label_probs")
        views.append("label_probs")
    return views


class SparkEngine:
    """Statements through Spark SQL over register_views' views."""

    name = "spark"

    def __init__(self, spark: SparkSession, tables: TablesCfg) -> None:
        self.spark = spark
        self.views = register_views(spark, tables)

    def run(self, sql: str, params: dict[str, str], limit: int | None) -> pa.Table:
        """The statement's rows (at most `limit`) as an Arrow table."""
        log.info("running SQL on Spark: %s %s", " ".join(sql.split()), params or "")
        df = self.spark.sql(sql, args=params or None)
        return (df if limit is None else df.limit(limit)).toArrow()

    @staticmethod
    def missing_table(err: Exception) -> bool:
        """True when Spark failed because the statement names a table or view that does not exist."""
        return isinstance(err, AnalysisException) and err.getCondition() == "TABLE_OR_VIEW_NOT_FOUND"

    def close(self) -> None:
        """Nothing to release: the job's owned_session stops the session."""
