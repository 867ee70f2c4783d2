"""The tagging pandas UDF: an InferenceEngine per Python worker, applied with mapInPandas."""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import pandas as pd
from pyspark import TaskContext
from pyspark.sql import DataFrame

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.tables.schemas import UDF_OUTPUT

log = logging.getLogger(__name__)

_ENGINES: dict[tuple["EngineSpec", str], object] = {}
_LOCK = threading.Lock()


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
    fetch: FetchCfg
    decode: DecodeCfg
    infer: InferCfg


def get_engine(spec: EngineSpec, device: str | None = None):
    """The worker's engine for `spec` on `device`, built on first use and reused by later tasks and batches."""
    device = device or spec.infer.device
    with _LOCK:
        engine = _ENGINES.get((spec, device))
        if engine is None:
            engine = _build_engine(spec, device)
            _ENGINES[(spec, device)] = engine
        return engine


def task_device(configured: str) -> str:
    """The GPU Spark assigned to this task (spark.task.resource.gpu.amount), else the configured device."""
    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    if configured != "cpu" and gpus is not None and gpus.addresses:
        return f"cuda:{gpus.addresses[0]}"
    return configured


def _build_engine(spec: EngineSpec, device: str):
    _worker_logging()
    # Imported here so the driver and non-tagging jobs never pay for torch at import time.
    from mumic_batch.io.fetch import Fetcher
    from mumic_batch.model.artifact import ClassEntry
    from mumic_batch.model.engine import InferenceEngine
    from mumic_batch.model.predictor import Predictor

    extras = [ClassEntry(z.name, z.prompt, z.threshold, zero_shot=True) for z in spec.zero_shot]
    predictor = Predictor.load(spec.artifact, zero_shot=extras, device=device,
                               precision=spec.infer.precision)
    if predictor.weights_sha256 != spec.weights_sha256:
        raise RuntimeError(
            f"model artifact {spec.artifact} changed during the run "
            f"(driver saw weights {spec.weights_sha256}, worker loaded {predictor.weights_sha256})"
        )
    log.info("python worker loaded model %s %s on %s", predictor.model_name, predictor.model_version, device)
    return InferenceEngine(predictor, Fetcher(spec.fetch), spec.decode, spec.infer, spec.fetch.threads)


def _worker_logging() -> None:
    """Python workers start with no logging setup; send INFO to stderr, which Spark keeps per executor."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s")


def tag_frames(spec: EngineSpec) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function: frames of (image_id, uri, source_updated_at) in, UDF_OUTPUT out."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        yield from get_engine(spec, task_device(spec.infer.device)).run(frames)

    return run


def with_predictions(df: DataFrame, spec: EngineSpec) -> DataFrame:
    """Apply the model to every row of `df` (columns image_id, uri, source_updated_at)."""
    return df.select("image_id", "uri", "source_updated_at").mapInPandas(tag_frames(spec), UDF_OUTPUT)
