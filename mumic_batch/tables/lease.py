"""One tagging run at a time per (predictions table, model version): a lease row in a small Delta table.

The lease table `<predictions>__leases` holds at most one row per model version (partitioned by it):
the run that holds the lease and until when. A run takes the lease with a MERGE that only replaces
an expired row (or its own); Delta's optimistic concurrency is the arbiter, since two runs that race
for the same version commit MERGEs that read the same partition, and the later commit fails with a
concurrent-modification error: that run then reads who won. On S3 this needs the DynamoDB LogStore
(docs/cluster.md), as every concurrent Delta writer does.

The holder renews its lease every lease_s/3 from a background thread and checks it before each
commit, so a run whose lease was taken over (it stalled longer than lease_s) stops before writing.
A killed run's lease expires after lease_s; the next run then takes it over. Runs of different
model versions touch different partitions and never conflict.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from mumic_batch.core.errors import RunStopped
from mumic_batch.tables.io import ensure_delta, table_exists
from mumic_batch.tables.schemas import LEASES

log = logging.getLogger(__name__)

# Commit conflicts: another run committed to the lease table between our read and our commit.
CONFLICT = re.compile(r"DELTA_CONCURRENT|DELTA_METADATA_CHANGED|DELTA_PROTOCOL_CHANGED|Concurrent\w*Exception")
TRIES = 8  # commit attempts when other versions' runs keep winning the race (each retry re-reads the row)


def lease_path(predictions: str) -> str:
    """Where the lease table of a predictions table lives."""
    return f"{predictions.rstrip('/')}__leases"


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    acquired_at: datetime
    expires_at: datetime

    def live(self, now: datetime) -> bool:
        return self.expires_at > now


class LeaseHeld(RunStopped):
    """Another run of the same model version is tagging into the same predictions table."""

    outcome = "locked"
    exit_code = 3


class LeaseLost(RunStopped):
    """This run's lease expired and another run took it over: it must not commit anything more."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Lease:
    """The lease of one run on (predictions, model_version); a context manager that renews and releases it.

    With a `releaser`, leaving the context hands the release to it and returns at once, so the run
    records itself while the lease is deleted; the releaser's owner waits for it before the session ends.
    """

    def __init__(self, spark: SparkSession, predictions: str, model_version: str, run_id: str, lease_s: float,
                 releaser: Executor | None = None) -> None:
        self.spark, self.path, self.version, self.run_id, self.lease_s = (
            spark, lease_path(predictions), model_version, run_id, lease_s)
        self.predictions, self._releaser = predictions, releaser
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lost: str | None = None
        self._renewing = threading.Lock()

    def __enter__(self) -> Lease:
        self.acquire()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._lost is None:
            if self._releaser is not None:
                self._releaser.submit(self.release)
            else:
                self.release()

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the run that holds it."""
        self._ensure_table()
        stale = self.holder()
        if stale is not None and stale.run_id != self.run_id and not stale.live(_now()):
            log.warning("taking over the expired lease of run %s (host %s) on model version %s: it expired at %s "
                        "without being released (the run was killed or stalled)", stale.run_id, stale.host,
                        self.version, stale.expires_at.isoformat())
        for _ in range(TRIES):
            try:
                self._merge(takeover=True)
            except Exception as err:  # noqa: BLE001 - only commit conflicts are retried
                if not CONFLICT.search(str(err)):
                    raise
                log.info("lease %s/%s: another run committed first, reading the lease again", self.path, self.version)
            holder = self.holder()
            if holder is not None and holder.run_id == self.run_id:
                log.info("run %s holds the lease on model version %s of %s until %s (renewed every %.0f s)",
                         self.run_id, self.version, self.predictions, holder.expires_at.isoformat(), self.lease_s / 3)
                return
            if holder is not None and holder.live(_now()):
                raise LeaseHeld(self._held_message(holder))
        raise RuntimeError(f"could not take the lease on {self.path} for model version {self.version} in "
                           f"{TRIES} attempts: other runs kept committing to it")

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds the lease (called before each commit).

        A lease that expired while no other run took it over is still this run's row: renewing it is
        safe, since a run taking it over at the same moment commits to the same partition and Delta
        lets only one of the two commits through.
        """
        holder = self.holder()
        if self._lost is None and holder is not None and holder.run_id == self.run_id:
            if holder.live(_now()):
                return
            log.warning("run %s: its lease expired at %s before a renewal (a stall, or a slow lease table); "
                        "nobody took it over, renewing it", self.run_id, holder.expires_at.isoformat())
            self._renew_once()
            holder = self.holder()
            if holder is not None and holder.run_id == self.run_id:
                return
        self._lost = self._lost or self._lost_message(holder)
        raise LeaseLost(self._lost)

    def _renew_once(self) -> None:
        try:
            with self._renewing:  # the renewer thread and check() would otherwise conflict with each other
                self._merge(takeover=False)
        except Exception as err:  # noqa: BLE001 - a conflict means another run committed: the re-read tells
            if not CONFLICT.search(str(err)):
                raise

    def holder(self) -> Holder | None:
        row = (_rows(self.spark, self.path).where(F.col("model_version") == self.version)
               .orderBy(F.col("expires_at").desc()).first())
        if row is None:
            return None
        return Holder(row["run_id"], row["host"], _utc(row["acquired_at"]), _utc(row["expires_at"]))

    def release(self) -> None:
        try:
            DeltaTable.forPath(self.spark, self.path).delete(
                (F.col("model_version") == self.version) & (F.col("run_id") == self.run_id))
            log.info("run %s released its lease on model version %s", self.run_id, self.version)
        except Exception:  # noqa: BLE001 - the lease then simply expires; never hide the run's own outcome
            log.warning("run %s could not release its lease on %s; it expires in at most %.0f s", self.run_id,
                        self.path, self.lease_s, exc_info=True)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._renew_once()
                holder = self.holder()
            except Exception:  # noqa: BLE001 - a failed renewal is retried; check() decides before commits
                log.warning("run %s could not renew its lease; retrying in %.0f s", self.run_id, self.lease_s / 3,
                            exc_info=True)
                continue
            if holder is None or holder.run_id != self.run_id:
                self._lost = self._lost_message(holder)
                log.error("%s", self._lost)
                return

    def _merge(self, takeover: bool) -> None:
        """Write this run's row: insert it, replace an expired (or our own) row, or (renewal) only our own."""
        now = _now()
        row = (self.version, self.run_id, socket.gethostname(), now, now, now + timedelta(seconds=self.lease_s))
        source = self.spark.createDataFrame([row], LEASES)
        ours = "t.run_id = s.run_id"
        replace = f"({ours} OR t.expires_at < s.renewed_at)" if takeover else ours
        merge = (DeltaTable.forPath(self.spark, self.path).alias("t")
                 .merge(source.alias("s"), f"t.model_version = '{_quoted(self.version)}' AND "
                                           "t.model_version = s.model_version"))
        keep_acquired = {c: f"s.{c}" for c in LEASES.fieldNames()}
        keep_acquired["acquired_at"] = f"CASE WHEN {ours} THEN t.acquired_at ELSE s.acquired_at END"
        merge = merge.whenMatchedUpdate(condition=replace, set=keep_acquired)
        if takeover:
            merge = merge.whenNotMatchedInsertAll()
        merge.execute()

    def _ensure_table(self) -> None:
        if not table_exists(self.spark, self.path):
            ensure_delta(self.spark, self.path, LEASES, ("model_version",))  # waits out a concurrent creator

    def _held_message(self, holder: Holder) -> str:
        return (f"model version {self.version} of {self.predictions} is being tagged by run {holder.run_id} "
                f"(host {holder.host}, since {holder.acquired_at.isoformat()}; its lease runs until "
                f"{holder.expires_at.isoformat()} and is renewed while it runs): this run did nothing. "
                f"Wait for that run to end; a killed run's lease is taken over once it expires (tag.lease_s)")

    def _lost_message(self, holder: Holder | None) -> str:
        who = f"run {holder.run_id} (host {holder.host})" if holder else "no run (the row was removed)"
        return (f"run {self.run_id} lost its lease on model version {self.version} of {self.predictions}: it is "
                f"now held by {who}; stopping before the next commit (a stall longer than tag.lease_s="
                f"{self.lease_s:.0f} s lets another run take over)")


def live_runs(spark: SparkSession, predictions: str) -> set[str]:
    """Run ids that hold an unexpired lease on any model version of `predictions`."""
    path = lease_path(predictions)
    if not table_exists(spark, path):
        return set()
    now = _now()
    return {r["run_id"] for r in _rows(spark, path).collect() if _utc(r["expires_at"]) > now}


def _rows(spark: SparkSession, path: str):
    """The lease rows with times as epoch seconds: unambiguous whatever the driver's time zone."""
    times = ("acquired_at", "renewed_at", "expires_at")
    table = spark.read.format("delta").load(path)
    return table.select(*[F.col(c).cast("double").alias(c) if c in times else c for c in table.columns])


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")

