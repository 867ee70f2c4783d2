"""The tagging pandas UDF: an InferenceEngine per Python worker, applied with mapInPandas."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import pandas as pd
from pyspark.sql import DataFrame

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.tables.schemas import UDF_OUTPUT

log = logging.getLogger(__name__)

_ENGINES: dict["EngineSpec", object] = {}
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


def get_engine(spec: EngineSpec):
    """The worker's engine for `spec`, built on first use and reused by later tasks and batches."""
    with _LOCK:
        engine = _ENGINES.get(spec)
        if engine is None:
            engine = _build_engine(spec)
            _ENGINES[spec] = engine
        return engine


def _build_engine(spec: EngineSpec):
    # Imported here so the driver and non-tagging jobs never pay for torch at import time.
    from mumic_batch.io.fetch import Fetcher
    from mumic_batch.model.artifact import ClassEntry
    from mumic_batch.model.engine import InferenceEngine
    from mumic_batch.model.predictor import Predictor

    extras = [ClassEntry(z.name, z.prompt, z.threshold, zero_shot=True) for z in spec.zero_shot]
    predictor = Predictor.load(spec.artifact, zero_shot=extras, device=spec.infer.device,
                               precision=spec.infer.precision)
    if predictor.weights_sha256 != spec.weights_sha256:
        raise RuntimeError(
            f"model artifact {spec.artifact} changed during the run "
            f"(driver saw weights {spec.weights_sha256}, worker loaded {predictor.weights_sha256})"
        )
    log.info("python worker loaded model %s %s", predictor.model_name, predictor.model_version)
    return InferenceEngine(predictor, Fetcher(spec.fetch), spec.decode, spec.infer, spec.fetch.threads)


def tag_frames(spec: EngineSpec) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function: frames of (image_id, uri, source_updated_at) in, UDF_OUTPUT out."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        yield from get_engine(spec).run(frames)

    return run


def with_predictions(df: DataFrame, spec: EngineSpec) -> DataFrame:
    """Apply the model to every row of `df` (columns image_id, uri, source_updated_at)."""
    return df.select("image_id", "uri", "source_updated_at").mapInPandas(tag_frames(spec), UDF_OUTPUT)
