"""One row per job run in the runs table, written on success and on failure."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

from pyspark.sql import SparkSession

from mumic_batch.core.errors import RunStopped, failure_message
from mumic_batch.tables.io import append_rows
from mumic_batch.tables.schemas import RUNS

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RunRecord:
    """What a job reports about one run; fields map 1:1 to the runs table."""

    job: str
    config: dict
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    model_name: str | None = None
    model_version: str | None = None
    source: str | None = None
    source_version: int | None = None
    selection: str | None = None
    input_rows: int | None = None
    processed: int | None = None  # rows committed to the output (scored and merged)
    selected: int | None = None  # rows the run set out to process
    status_counts: dict[str, int] = field(default_factory=dict)  # of the committed rows
    status_examples: dict[str, str] = field(default_factory=dict)  # one uri per status (for messages)
    images_per_s: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    message: str | None = None
    chunks: int | None = None
    chunks_merged: int | None = None

    def row(self, outcome: str) -> tuple:
        return (
            self.run_id, self.job, self.model_name, self.model_version,
            json.dumps(self.config, sort_keys=True), self.started_at, datetime.now(timezone.utc),
            outcome, self.message, self.source, self.source_version, self.selection, self.input_rows, self.processed, self.status_counts,
            self.images_per_s, self.stage_seconds, self.chunks, self.chunks_merged, self.selected,
        )


def write_run(spark: SparkSession, record: RunRecord, path: str, outcome: str) -> None:
    """Append the run's row; a failure to record a failed run is logged, not raised over the cause."""
    try:
        append_rows(spark, [record.row(outcome)], RUNS, path)
        log.info("run %s recorded in %s (outcome=%s)", record.run_id, path, outcome)
    except Exception:
        if outcome == "succeeded":
            raise
        log.exception("could not record failed run %s in %s", record.run_id, path)


def recorded(spark: SparkSession, record: RunRecord, path: str, work: Callable[[], T]) -> T:
    """Run work() and append the run's row: succeeded, or failed (locked, ...) with the cause as its message."""
    try:
        result = work()
    except Exception as err:
        record.message = failure_message(err)
        err.run_id = record.run_id  # the job's JSON summary names the run, to find its runs row
        write_run(spark, record, path, err.outcome if isinstance(err, RunStopped) else "failed")
        raise
    write_run(spark, record, path, "succeeded")
    return result

