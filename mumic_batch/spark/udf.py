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

_LOCK = threading.Lock()
WARM_UP_NICE = 10  # added to the nice value of the thread that runs a warm-up load
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


class _Load:
    """One build of a worker's runner: in the task's own thread, or in the background for the warm-up."""

    def __init__(self, spec: EngineSpec, device: str, cores: int, background: bool) -> None:
        self.spec, self.device, self.cores, self.background = spec, device, cores, background
        self.done = threading.Event()
        self.engine: object | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.engine = _build_engine(self.spec, self.device, self.cores)
        except BaseException as err:  # noqa: BLE001 - raised again in the task that waits for this load
            self.error = err
            if self.background:
                log.warning("loading the model in the background failed; the next scoring task loads it again: "
                            "%s", str(err).splitlines()[0][:300] if str(err) else type(err).__name__)
        finally:
            self.done.set()

    @property
    def state(self) -> str:
        if not self.done.is_set():
            return "loading"
        return "failed" if self.error is not None else "loaded"


_ENGINES: dict[tuple[EngineSpec, str], _Load] = {}


def _claim(spec: EngineSpec, device: str, background: bool) -> tuple[_Load, bool]:
    """This worker's load of the runner for (spec, device), and whether the caller must start it.

    A failed load is replaced, so a task after a failure tries again (as Spark's task retries expect).
    The task's cores are read here, in the task's thread: a background load runs after the task ended.
    """
    with _LOCK:
        load = _ENGINES.get((spec, device))
        if load is not None and load.state != "failed":
            return load, False
        load = _ENGINES[(spec, device)] = _Load(spec, device, _task_cores(), background)
        return load, True


def get_engine(spec: EngineSpec, device: str | None = None):
    """The worker's runner for `spec` on `device`, built on first use and reused by later tasks and batches.

    A load the warm-up started is waited for; if it failed, this task loads again, so the error a
    task raises is always its own.
    """
    device = device or spec.infer.device
    load = _finished_load(spec, device)
    if load.error is not None and load.background:
        load = _finished_load(spec, device)
    if load.error is not None:
        raise load.error
    return load.engine


def _finished_load(spec: EngineSpec, device: str) -> _Load:
    load, new = _claim(spec, device, background=False)
    if new:
        load.run()
    elif not load.done.is_set():
        waited = time.perf_counter()
        load.done.wait()
        log.info("waited %.1f s for the model the warm-up was loading", time.perf_counter() - waited)
    return load


def start_engine(spec: EngineSpec, device: str) -> str:
    """Start building the runner for `spec` on `device` in a background thread and return at once.

    Returns what this worker had before: 'none' (the load starts now), 'loading' or 'loaded'.
    """
    load, new = _claim(spec, device, background=True)
    if not new:
        return load.state
    threading.Thread(target=_in_background, args=(load,), name="mumic-warm-up", daemon=True).start()
    return "none"


def _in_background(load: _Load) -> None:
    """Run a warm-up load at a lower CPU priority (this thread only; Linux).

    The load only has to end before scoring starts, and scoring also waits for the driver's lease
    and selection: where the two share cores (local mode, an executor beside the driver), the
    driver's work goes first and the load takes the cores it leaves. Measured on 2 cores: the
    driver's work before scoring 16.5-16.9 s instead of 17.3-21.9 s (docs/benchmarks.md).
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_UP_NICE)
    except (AttributeError, OSError) as err:  # per-thread priorities are a Linux feature
        log.info("warm-up load runs at normal priority: %s", err)
    load.run()


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


def _build_engine(spec: EngineSpec, device: str, cores: int):
    _worker_logging()
    # Imported here so the driver and non-tagging jobs never pay for torch at import time.
    from mumic_batch.inference.runner import Runner
    from mumic_batch.io.fetch import Fetcher
    from mumic_batch.model.manifest import ClassEntry
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
    if not infer.decode_workers and cores:
        infer = dataclasses.replace(infer, decode_workers=cores)
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

    A Spark job of `tasks` one-row tasks starts each worker's runner loading in a background thread
    (start_engine) and ends at once: the task slots stay free for the driver's own jobs (lease,
    selection), which would otherwise queue behind the loads. Spark keeps the idle workers
    (spark.python.worker.reuse) and hands them to the scoring tasks; finish() waits for the loads
    before scoring starts. It runs in its own job group from a driver thread; stop() cancels it when the run ends first
    (nothing to score, a held lease, an error). Idle workers are stopped after a minute, so a
    selection slower than that loses the head start, nothing else. The warm-up runs through
    mapInArrow like scoring: Spark pools Python workers per kind of runner.
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
        """Wait for the warm-up job to end; its rows (pid, had) per task, empty if it failed."""
        self._thread.join(timeout)
        return self.loaded

    def finish(self) -> float:
        """Before scoring: wait until the workers the warm-up reached have loaded the model; the seconds waited.

        One more job of `tasks` tasks, each waiting for its worker's load (get_engine), so the scoring
        stage starts on loaded workers and measures scoring alone. Nothing happens when the warm-up
        failed or was cancelled; a failure here is logged and left to scoring, which loads the model
        itself and fails with its own error.
        """
        self.wait()
        if not self.loaded:
            return 0.0
        started = time.perf_counter()
        thread = threading.Thread(target=self._await_loads, name="warm-up-finish", daemon=True)
        thread.start()
        thread.join()
        return time.perf_counter() - started

    def _await_loads(self) -> None:
        started = time.perf_counter()
        try:
            self.spark.sparkContext.setJobGroup(self.group, "wait for the Python workers to load the model")
            rows = (self.spark.range(self.tasks, numPartitions=self.tasks)
                    .mapInArrow(_ready_batches(self.spec), READY_OUTPUT).collect())
            log.info("warm-up: %d Python workers have the model; the driver waited %.1f s for their loads",
                     len({r["pid"] for r in rows}), time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001 - scoring loads the model itself and reports a real failure
            log.warning("waiting for the warm-up's loads failed, scoring loads the model itself: %s",
                        str(err).splitlines()[0][:300])

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
            had = [r["had"] for r in self.loaded]
            log.info("warm-up: %d Python workers started loading the model in the background, %d were loading "
                     "it, %d had it (%.1f s)", had.count("none"), had.count("loading"), had.count("loaded"),
                     time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001 - scoring loads the model itself and reports a real failure
            if self._cancelled:
                log.info("warm-up cancelled after %.1f s: the run needs no scoring", time.perf_counter() - started)
            else:
                log.warning("warm-up failed, scoring loads the model itself: %s", str(err).splitlines()[0][:300])
        finally:
            self._done.set()


WARM_UP_OUTPUT = "pid long, had string"


def _warm_batches(spec: EngineSpec) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        had = start_engine(spec, task_device(spec.infer.device))
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "had": [had]})

    return run


READY_OUTPUT = "pid long"


def _ready_batches(spec: EngineSpec) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        get_engine(spec, task_device(spec.infer.device))
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()]})

    return run


def with_predictions(df: DataFrame, spec: EngineSpec) -> DataFrame:
    """Apply the model to every row of `df` (columns image_id, uri, source_updated_at)."""
    return df.select("image_id", "uri", "source_updated_at").mapInArrow(tag_batches(spec), UDF_OUTPUT)
