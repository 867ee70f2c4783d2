"""Tagging: catalogue -> work selection -> worklist (written once) in chunks -> per chunk: model UDF ->
staged Delta -> commit (append the new rows, MERGE the rest) -> runs row. Nightly runs are one chunk;
backfills many, resumable after a crash, with chunk k committed while chunk k+1 scores."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mumic_batch.config import JobCfg, TagCfg, ZeroShotClassCfg, to_dict
from mumic_batch.core import status as st
from mumic_batch.core.errors import ThresholdsExceeded
from mumic_batch.core.health import check_thresholds
from mumic_batch.model.manifest import Manifest, check_artifact, check_base, check_weights, read_artifact_manifest
from mumic_batch.pipeline.runs import RunRecord, recorded
from mumic_batch.pipeline.selection import BROADCAST_IDS, Selection, catalogue_version, select_work
from mumic_batch.spark.udf import EngineSpec, WarmUp, ZeroShotClass, with_predictions
from mumic_batch.tables import retry
from mumic_batch.tables.io import (
    append_predictions,
    delete_if_empty,
    delete_path,
    staging_root,
    ensure_predictions,
    list_dir,
    merge_predictions,
)
from mumic_batch.tables.lease import Lease, live_runs
from mumic_batch.tables.schemas import TIMING_COLUMNS

log = logging.getLogger(__name__)

JOB = "tag_images"
# How much better the base model must rank a zero-shot class on validation before the log points to it.
_BASE_AUC_MARGIN = 0.05


def run(spark: SparkSession, cfg: JobCfg) -> dict:
    """Tag the catalogue's new, changed and retryable rows; return the run summary."""
    record = RunRecord(JOB, to_dict(cfg))
    # The lease is deleted while the runs row is written (two small commits at once, ~1 s saved); the
    # pool's exit waits for the release, so the lease is gone when the job returns.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease-release") as releaser:
        return recorded(spark, record, cfg.tables.runs, lambda: _tag(spark, cfg, record, releaser))


def _tag(spark: SparkSession, cfg: JobCfg, record: RunRecord, releaser: ThreadPoolExecutor) -> dict:
    manifest = read_artifact_manifest(cfg.model.artifact)
    spec, slots = engine_spec(cfg, manifest), _slots(spark)
    # The workers start loading the model while the driver checks its weights (they check the same
    # sha256 on the bytes they parse); a failed check cancels the warm-up. One worker per scoring slot
    # at most: scoring never runs more at once.
    warm_up = WarmUp(spark, spec, min(slots, cfg.tag.partitions or slots)).start() if cfg.tag.warm_up else None
    try:
        _check_model(cfg, record, manifest)
        with Lease(spark, cfg.tables.predictions, manifest.version, record.run_id, cfg.tag.lease_s,
                   releaser) as lease:
            _select_and_score(spark, cfg, record, manifest, lease, spec, slots, warm_up)
    finally:
        if warm_up is not None:
            warm_up.stop()
    failure = check_thresholds(record.status_counts, record.status_examples, asdict(cfg.tag.max_error_rate),
                               cfg.tag.min_ok_rows)
    if failure:
        raise ThresholdsExceeded(f"run {record.run_id} committed its {record.processed} rows but is failed: {failure}")
    return summary(cfg, record)


def _check_model(cfg: JobCfg, record: RunRecord, manifest: Manifest) -> None:
    """Checked on every run, also one with nothing to score: a corrupt model fails the night it appears.
    The driver streams the weights through sha256 once and builds no model."""
    check_weights(cfg.model.artifact, manifest)
    record.model_name, record.model_version = manifest.name, manifest.version
    log.info("run %s: model %s version %s from %s", record.run_id, manifest.name, manifest.version,
             cfg.model.artifact)
    from_base = cfg.model.zero_shot_from == "base" and bool(cfg.model.zero_shot)
    if from_base:
        location, _ = manifest.base_artifact()
        check_base(manifest, check_artifact(location), location)
    for z in cfg.model.zero_shot:
        _log_zero_shot(manifest, z, from_base)


def engine_spec(cfg: JobCfg, manifest: Manifest) -> EngineSpec:
    """What every Python worker needs to build the runner for this run's model and settings."""
    return EngineSpec(
        artifact=cfg.model.artifact,
        weights_sha256=manifest.weights_sha256,
        zero_shot=tuple(ZeroShotClass(z.name, z.prompt, z.threshold) for z in cfg.model.zero_shot),
        zero_shot_from=cfg.model.zero_shot_from,
        fetch=cfg.fetch, decode=cfg.decode, infer=cfg.infer,
    )


def _slots(spark: SparkSession) -> int:
    return task_slots(dict(spark.sparkContext.getConf().getAll()), _executors(spark),
                      spark.sparkContext.defaultParallelism)


def _select_and_score(spark: SparkSession, cfg: JobCfg, record: RunRecord, manifest: Manifest, lease: Lease,
                      spec: EngineSpec, slots: int, warm_up: WarmUp | None) -> None:
    started = time.perf_counter()
    source = catalogue_version(spark, cfg.tables)
    retry.ensure_retry(spark, cfg.tables.predictions)
    selection = select_work(spark, cfg.tables, cfg.tag, manifest.version, source)
    # The catalogue passed its checks. Only the commits use the predictions table: create (or
    # upgrade) it while the driver writes the worklist.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictions-table") as pool:
        table = pool.submit(ensure_predictions, spark, cfg.tables.predictions)
        _stage_and_score(spark, cfg, record, selection, spec, slots, lease, warm_up, table, started)


def _stage_and_score(spark: SparkSession, cfg: JobCfg, record: RunRecord, selection: Selection, spec: EngineSpec,
                     slots: int, lease: Lease, warm_up: WarmUp | None, table: Future, started: float) -> None:
    record.source, record.source_version = cfg.tables.catalogue, selection.source_version
    record.selection = selection.method
    root = staging_root(cfg.tables.predictions)
    _remove_stale_staging(spark, cfg.tables.predictions, root, record.run_id)
    staging = f"{root}/{record.run_id}"
    try:
        chunks = _worklist(spark, selection, f"{staging}/worklist", cfg.tag)
        record.input_rows = selection.input_rows()
        record.selected, record.chunks, record.processed = sum(c.rows for c in chunks), len(chunks), 0
        _add_seconds(record, "select", time.perf_counter() - started)
        log.info("run %s: %s catalogue rows, %d to process (selected by %s in %.1f s), chunks: %d", record.run_id,
                 record.input_rows, record.selected, selection.method, record.stage_seconds["select"],
                 record.chunks)
        if record.selected:
            if warm_up is not None:
                _add_seconds(record, "warm_up_wait", warm_up.finish())
            _score_chunks(spark, cfg, record, staging, chunks, spec, slots, lease, table)
        else:
            table.result()
            if warm_up is not None:
                warm_up.stop()
            record.message = "nothing to do: every catalogue row already has a current prediction"
            log.info("run %s: %s", record.run_id, record.message)
    finally:
        delete_path(spark, staging)
        delete_if_empty(spark, root)


def _log_zero_shot(manifest: Manifest, z: ZeroShotClassCfg, from_base: bool) -> None:
    """How far a zero-shot class can be trusted with the model scoring it: its validation AUC, where measured."""
    entry = manifest.zero_shot_class(z.name, z.prompt, z.threshold, from_base)
    scorer = "the base model" if from_base else "this model"
    if entry.auc is None:
        log.warning("zero-shot class %s: no validation estimate for %s (training did not see the class "
                    "labelled, or its prompt differs); threshold %.2f from the config, unchecked", entry.name,
                    scorer, entry.threshold)
    elif not entry.assign:
        log.warning("zero-shot class %s: validation AUC %.3f for %s; never assigned (%s); its "
                    "probabilities are still stored", entry.name, entry.auc, scorer, entry.note or "below its target")
    else:
        log.info("zero-shot class %s: validation AUC %.3f for %s, threshold %.3f chosen on validation%s",
                 entry.name, entry.auc, scorer, entry.threshold, f" ({entry.note})" if entry.note else "")
    base = manifest.zero_shot_class(z.name, z.prompt, z.threshold, from_base=True)
    if not from_base and base.auc is not None and base.auc > (entry.auc or 0.0) + _BASE_AUC_MARGIN:
        log.warning("zero-shot class %s: validation AUC %.3f with the base model this one was fine-tuned from, "
                    "%s with this one; model.zero_shot_from=base scores it with the base model (a second image "
                    "tower per image)", entry.name, base.auc, "unmeasured" if entry.auc is None else f"{entry.auc:.3f}")


@dataclass(frozen=True)
class Chunk:
    """One chunk of the worklist: `prior` of its `rows` already have a prediction (MERGEd, not appended)."""

    number: int
    todo: DataFrame
    rows: int
    prior: int


def _remove_stale_staging(spark: SparkSession, predictions: str, root: str, run_id: str) -> None:
    """Delete the staging directories of runs that hold no live lease (killed, or crashed before cleaning up)."""
    others = [name for name in list_dir(spark, root) if name != run_id]
    if not others:
        return
    live = live_runs(spark, predictions)
    for name in others:
        if name in live:
            log.info("staging directory %s/%s belongs to run %s, which holds a live lease: kept", root, name, name)
            continue
        log.warning("removing staging directory %s/%s: run %s holds no live lease (it was killed or crashed "
                    "before cleaning up)", root, name, name)
        delete_path(spark, f"{root}/{name}")


def _worklist(spark: SparkSession, selection: Selection, path: str, tag: TagCfg) -> list[Chunk]:
    """Write the selected rows once to `path` (counted by the commit's metrics) and split them into chunks.

    Scoring reads the worklist, never the selection plan again. A run of more than tag.chunk_rows
    rows rewrites the (narrow) worklist once more, partitioned by `chunk`: contiguous ranges of
    image_id, so that every chunk is a fixed set of rows whatever the commits before it change, and
    every chunk's appended files cover a narrow slice of ids.
    """
    if selection.rows is None:
        return []
    selection.rows.write.format("delta").save(path)
    rows = int(DeltaTable.forPath(spark, path).history(1).first()["operationMetrics"]["numOutputRows"])
    if rows == 0:
        return []
    worklist = spark.read.format("delta").load(path)
    if selection.has_prior is None:
        prior = worklist.where(F.col("prior_attempts").isNotNull()).count()
    else:
        prior = rows if selection.has_prior else 0
    if rows <= tag.chunk_rows:
        return [Chunk(1, worklist, rows, prior)]
    n = math.ceil(rows / tag.chunk_rows)
    chunked_path = f"{path}-chunks"
    (worklist.repartitionByRange(n, "image_id").withColumn("chunk", F.spark_partition_id())
     .write.format("delta").partitionBy("chunk").save(chunked_path))
    chunked = spark.read.format("delta").load(chunked_path)
    counts = sorted(
        (int(r["chunk"]), int(r["rows"]), int(r["prior"]))
        for r in chunked.groupBy("chunk").agg(F.count(F.lit(1)).alias("rows"),
                                              F.count("prior_attempts").alias("prior")).collect()
    )
    return [Chunk(i, chunked.where(F.col("chunk") == c).drop("chunk"), count, p)
            for i, (c, count, p) in enumerate(counts, start=1)]


def _score_chunks(spark: SparkSession, cfg: JobCfg, record: RunRecord, staging: str, chunks: list[Chunk],
                  spec: EngineSpec, slots: int, lease: Lease, table: Future) -> None:
    """Score chunk by chunk while a driver thread commits the previous one.

    Commits run one at a time and in order, so a crash loses at most the chunk being committed and
    the one being scored, and a rerun resumes from what was committed. The scoring slots are idle
    only while the next chunk waits for the previous commit, and during the last commit. The runs
    row counts a chunk's rows and statuses only once its commit succeeded. `table`: the creation
    of the predictions table, which must have succeeded before the first commit.
    """
    table.result()
    record.chunks_merged, idle, lock = 0, 0.0, threading.Lock()
    started = time.perf_counter()
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit") as committer:
        for chunk in chunks:
            scored = f"{staging}/scored-{chunk.number}"
            log.info("run %s: chunk %d/%d: scoring %d rows", record.run_id, chunk.number, len(chunks), chunk.rows)
            stats = _score(spark, cfg, record, chunk, spec, scored, slots, lock)
            if pending is not None:
                waited = time.perf_counter()
                pending.result()
                idle += time.perf_counter() - waited
            pending = committer.submit(_commit, spark, cfg, record, chunk, scored, stats, started, lock, lease)
        waited = time.perf_counter()
        pending.result()
        idle += time.perf_counter() - waited
    wall = time.perf_counter() - started
    _add_seconds(record, "score_idle", idle, lock)
    log.info("run %s: scoring slots (%d) idle for %.1f s of %.1f s while waiting for commits", record.run_id,
             slots, idle, wall)
    scoring = record.stage_seconds["score_wall"]
    record.images_per_s = record.processed / scoring if scoring > 0 else None


@dataclass(frozen=True)
class ChunkStats:
    """A scored chunk's rows by status, with one example uri per status."""

    counts: dict[str, int]
    examples: dict[str, str]

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


def _score(spark: SparkSession, cfg: JobCfg, record: RunRecord, chunk: Chunk, spec: EngineSpec, staging: str,
           slots: int, lock: threading.Lock) -> ChunkStats:
    """Run the model once over the chunk into the staging table `staging`."""
    tasks = score_tasks(cfg.tag, chunk.rows, slots)
    # An explicit count survives adaptive execution, which would otherwise coalesce a small URI table
    # into a single task and leave every other task slot (and GPU) idle.
    todo = chunk.todo.select("image_id", "uri", "source_updated_at").repartition(tasks)
    log.info("run %s: scoring in %d tasks (%d scoring slots)", record.run_id, tasks, slots)
    scored = with_predictions(todo, spec).select(
        "*",
        F.lit(record.model_name).alias("model_name"),
        F.lit(record.model_version).alias("model_version"),
        F.lit(spec.weights_sha256).alias("model_sha256"),
        F.lit(record.run_id).alias("run_id"),
        F.current_timestamp().alias("tagged_at"),
    )
    started = time.perf_counter()
    # Materialise the UDF once: MERGE reads its source twice and fetching is not deterministic.
    scored.write.format("delta").mode("overwrite").save(staging)
    scored_s = time.perf_counter() - started
    return _stats(record, spark.read.format("delta").load(staging), scored_s, lock)


def _commit(spark: SparkSession, cfg: JobCfg, record: RunRecord, chunk: Chunk, staging: str, stats: ChunkStats,
            started: float, lock: threading.Lock, lease: Lease) -> None:
    began = time.perf_counter()
    lease.check()
    commit_chunk(spark, cfg.tables.predictions, cfg.tag, record.run_id, record.model_version, chunk, staging,
                 stats.counts)
    with lock:
        record.chunks_merged += 1
        record.stage_seconds["write"] = record.stage_seconds.get("write", 0.0) + time.perf_counter() - began
        record.processed += stats.rows
        for status, n in stats.counts.items():
            record.status_counts[status] = record.status_counts.get(status, 0) + n
            record.status_examples.setdefault(status, stats.examples[status])
        done = record.processed
    elapsed = time.perf_counter() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (record.selected - done) / rate if rate else 0.0
    log.info("run %s: chunk %d/%d merged into predictions: %d of %d rows (%.0f%%), %.1f images/s, about %.0f s "
             "left; statuses so far %s", record.run_id, chunk.number, record.chunks, done, record.selected,
             100.0 * done / record.selected, rate, left, record.status_counts)


def commit_chunk(spark: SparkSession, predictions: str, tag: TagCfg, run_id: str, model_version: str, chunk: Chunk,
                 staging: str, statuses: Collection[str]) -> None:
    """Commit one scored chunk into an existing predictions table (ensure_predictions): append its
    new rows (at most once per run and chunk), MERGE the rest, and keep the retry table a superset
    of the transient failures. `statuses`: the statuses the staged rows have (ChunkStats.counts)."""
    staged = spark.read.format("delta").load(staging)
    if chunk.prior:
        prior = chunk.todo.where(F.col("prior_attempts").isNotNull()).select("image_id", "prior_attempts")
        staged = staged.join(F.broadcast(prior) if chunk.prior <= BROADCAST_IDS else prior, "image_id", "left")
    else:
        staged = staged.withColumn("prior_attempts", F.lit(None).cast("int"))
    # What the MERGE will count; the retry table needs it before the commit.
    staged = staged.withColumn("attempts", (F.coalesce("prior_attempts", F.lit(0)) + 1).cast("int"))
    failed = any(st.is_transient(status) for status in statuses)
    if failed:
        retry.add_failures(spark, predictions, staged, tag.max_attempts)
    if chunk.rows > chunk.prior:
        append_predictions(spark, staged.where(F.col("prior_attempts").isNull()), predictions, f"{JOB}:{run_id}",
                           chunk.number)
    if chunk.prior:
        merge_predictions(spark, staged.where(F.col("prior_attempts").isNotNull()), predictions, model_version)
    # Only rows that had a prediction, or failed just now, can be in the retry table.
    if chunk.prior or failed:
        retry.remove_resolved(spark, predictions, staged, tag.max_attempts)
    delete_path(spark, staging)


def task_slots(conf: dict[str, str], executors: int, default_parallelism: int) -> int:
    """Tasks that can score at once: GPU slots when tasks request GPUs, else CPU slots."""
    gpu = float(conf.get("spark.task.resource.gpu.amount", "0") or 0)
    if gpu > 0:
        per_executor = float(conf.get("spark.executor.resource.gpu.amount", "1"))
        instances = int(conf.get("spark.executor.instances", "0") or 0)
        return max(1, math.floor(max(instances, executors, 1) * per_executor / gpu + 1e-9))
    return max(1, default_parallelism // max(1, int(conf.get("spark.task.cpus", "1"))))


def _executors(spark: SparkSession) -> int:
    """Executors registered now (local mode: the driver is the executor)."""
    sc = spark.sparkContext
    if sc.master.startswith("local"):
        return 1
    return max(1, sc._jsc.sc().getExecutorMemoryStatus().size() - 1)


def score_tasks(tag: TagCfg, rows: int, slots: int) -> int:
    """tag.partitions when set; else one task per slot, but no task with fewer than rows_per_task rows."""
    if tag.partitions:
        return tag.partitions
    return max(1, min(slots, -(-rows // tag.rows_per_task)))


def _stats(record: RunRecord, staged: DataFrame, scored_s: float, lock: threading.Lock) -> ChunkStats:
    """A chunk's counts and an example uri by status, and its summed stage times, from one aggregation."""
    rows = staged.groupBy("status").agg(F.count("*").alias("n"), F.min("uri").alias("example"),
                                        *[F.sum(c).alias(c) for c in TIMING_COLUMNS]).collect()
    for c in TIMING_COLUMNS:
        _add_seconds(record, c.removesuffix("_ms"), sum(float(r[c] or 0.0) for r in rows) / 1000.0, lock)
    _add_seconds(record, "score_wall", scored_s, lock)
    return ChunkStats({r["status"]: int(r["n"]) for r in rows}, {r["status"]: r["example"] for r in rows})


def _add_seconds(record: RunRecord, stage: str, seconds: float, lock: threading.Lock | None = None) -> None:
    if lock is None:
        record.stage_seconds[stage] = record.stage_seconds.get(stage, 0.0) + seconds
        return
    with lock:
        record.stage_seconds[stage] = record.stage_seconds.get(stage, 0.0) + seconds


def summary(cfg: JobCfg, record: RunRecord) -> dict:
    """The job's one-line JSON summary."""
    return {
        "job": JOB,
        "run_id": record.run_id,
        "model_version": record.model_version,
        "input_rows": record.input_rows,
        "selected": record.selected,
        "processed": record.processed,
        "chunks": record.chunks,
        "selection": record.selection,
        "status_counts": record.status_counts,
        "images_per_s": record.images_per_s,
        "predictions": cfg.tables.predictions,
        "runs": cfg.tables.runs,
    }
