"""The tagging UDF: a Runner per Python worker, applied with mapInArrow (Arrow batches in and out)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.tables.schemas import UDF_OUTPUT

log = logging.getLogger(__name__)

_ENGINES: dict[tuple["EngineSpec", str], object] = {}
_LOCK = threading.Lock()
_WORKER_INDEX: int | None = None  # set by the first task this Python worker runs


@dataclass(frozen=True)
class ZeroShotClass:
    name: str
    prompt: str
    threshold: float


@dataclass(frozen=True)
class EngineSpec:
    """Everything a Python worker needs to build its engine; small, frozen and picklable."""

    artifact: str
    weights_sha256: str  # part of the cache key: a changed artifact never reuses a stale model
    zero_shot: tuple[ZeroShotClass, ...]
    zero_shot_from: str  # self | base (model.zero_shot_from)
    fetch: FetchCfg
    decode: DecodeCfg
    infer: InferCfg


def get_engine(spec: EngineSpec, device: str | None = None):
    """The worker's runner for `spec` on `device`, built on first use and reused by later tasks and batches."""
    device = device or spec.infer.device
    with _LOCK:
        engine = _ENGINES.get((spec, device))
        if engine is None:
            engine = _build_engine(spec, device)
            _ENGINES[(spec, device)] = engine
        return engine


def has_engine(spec: EngineSpec, device: str) -> bool:
    """True when this worker has built the runner for `spec` on `device` already."""
    with _LOCK:
        return (spec, device) in _ENGINES


def task_device(configured: str) -> str:
    """The GPU Spark assigned to this task (spark.task.resource.gpu.amount), else the configured device.

    Without Spark GPU scheduling, 'auto'/'cuda' become 'auto#N'/'cuda#N': N is this worker's index
    (the partition of its first task), which spreads the Python workers over the visible GPUs.
    """
    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    if configured != "cpu" and gpus is not None and gpus.addresses:
        return f"cuda:{gpus.addresses[0]}"
    if configured == "cpu" or ctx is None:
        return configured
    global _WORKER_INDEX
    if _WORKER_INDEX is None:
        _WORKER_INDEX = ctx.partitionId()
    return f"{configured}#{_WORKER_INDEX}"


def _task_cores() -> int:
    """The CPU cores Spark gave this task (spark.task.cpus), 0 when unknown or just one."""
    ctx = TaskContext.get()
    cpus = ctx.cpus() if ctx is not None else 0
    return cpus if cpus > 1 else 0


def _build_engine(spec: EngineSpec, device: str):
    _worker_logging()
    # Imported here so the driver and non-tagging jobs never pay for torch at import time.
    from mumic_batch.inference.runner import Runner
    from mumic_batch.io.fetch import Fetcher
    from mumic_batch.model.artifact import ClassEntry
    from mumic_batch.model.device import resolve_device
    from mumic_batch.model.predictor import Predictor

    name, _, index = device.partition("#")
    target = resolve_device(name, int(index) if index else None)
    extras = [ClassEntry(z.name, z.prompt, z.threshold, zero_shot=True) for z in spec.zero_shot]
    predictor = Predictor.load(spec.artifact, zero_shot=extras, device=target, precision=spec.infer.precision,
                               compile_model=spec.infer.compile, zero_shot_from=spec.zero_shot_from)
    if predictor.weights_sha256 != spec.weights_sha256:
        raise RuntimeError(
            f"model artifact {spec.artifact} changed during the run "
            f"(driver saw weights {spec.weights_sha256}, worker loaded {predictor.weights_sha256})"
        )
    log.info("python worker loaded model %s %s on %s", predictor.model_name, predictor.model_version, target)
    infer = spec.infer
    if not infer.decode_workers and _task_cores():
        infer = dataclasses.replace(infer, decode_workers=_task_cores())
    return Runner(predictor, Fetcher(spec.fetch), spec.decode, infer, spec.fetch.threads)


def _worker_logging() -> None:
    """Python workers start with no logging setup; send INFO to stderr, which Spark keeps per executor."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s")


def tag_batches(spec: EngineSpec) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow function: batches of (image_id, uri, source_updated_at) in, UDF_OUTPUT out."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from get_engine(spec, task_device(spec.infer.device)).run(batches)

    return run


class WarmUp:
    """Python workers that load the model while the driver takes the lease and selects the rows.

    A Spark job of `tasks` one-row tasks builds each worker's runner (get_engine caches it) and
    returns. Spark keeps the idle workers (spark.python.worker.reuse) and hands them to the scoring
    tasks, which then start at once. It runs in its own job group from a driver thread; stop()
    cancels it when the run ends first (nothing to score, a held lease, an error). Idle workers are
    stopped after a minute, so a selection slower than that loses the head start, nothing else.
    The warm-up runs through mapInArrow like scoring: Spark pools Python workers per kind of runner.
    """

    def __init__(self, spark: SparkSession, spec: EngineSpec, tasks: int) -> None:
        self.spark, self.spec, self.tasks = spark, spec, tasks
        self.group = f"mumic-warm-up-{id(self)}"
        self._thread = threading.Thread(target=self._run, name="warm-up", daemon=True)
        self._done = threading.Event()
        self._cancelled = False
        self.loaded: list = []

    def start(self) -> WarmUp:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> list:
        """Wait for the warm-up to end; its rows (pid, seconds, cached) per task, empty if it failed."""
        self._thread.join(timeout)
        return self.loaded

    def stop(self) -> None:
        """Cancel the warm-up if it is still running and wait for its thread."""
        if not self._done.is_set():
            self._cancelled = True
            self.spark.sparkContext.cancelJobGroup(self.group)
        self._thread.join()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self.spark.sparkContext.setJobGroup(self.group, "load the model in the Python workers")
            self.loaded = (self.spark.range(self.tasks, numPartitions=self.tasks)
                           .mapInArrow(_warm_batches(self.spec), WARM_UP_OUTPUT).collect())
            cached = sum(r["cached"] for r in self.loaded)
            log.info("warm-up: %d Python workers loaded the model in %.1f s (longest %.1f s), %d had it already",
                     len(self.loaded) - cached, time.perf_counter() - started,
                     max((r["seconds"] for r in self.loaded), default=0.0), cached)
        except Exception as err:  # noqa: BLE001 - scoring loads the model itself and reports a real failure
            if self._cancelled:
                log.info("warm-up cancelled after %.1f s: the run needs no scoring", time.perf_counter() - started)
            else:
                log.warning("warm-up failed, scoring loads the model itself: %s", str(err).splitlines()[0][:300])
        finally:
            self._done.set()


WARM_UP_OUTPUT = "pid long, seconds double, cached boolean"


def _warm_batches(spec: EngineSpec) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        started, device = time.perf_counter(), task_device(spec.infer.device)
        cached = has_engine(spec, device)
        get_engine(spec, device)
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "seconds": [time.perf_counter() - started],
                                          "cached": [cached]})

    return run


def with_predictions(df: DataFrame, spec: EngineSpec) -> DataFrame:
    """Apply the model to every row of `df` (columns image_id, uri, source_updated_at)."""
    return df.select("image_id", "uri", "source_updated_at").mapInArrow(tag_batches(spec), UDF_OUTPUT)
