"""The inference engine: fetch -> decode -> preprocess -> model -> postprocess, without Spark.

Rows go in and come out as pandas frames so the same engine serves the Spark UDF, evaluation,
training data loading and the benchmarks. Fetch and decode run on a thread pool (I/O and Pillow
release the GIL) while the model scores the previous batch, so the stages overlap.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from mumic_batch.config import DecodeCfg, InferCfg
from mumic_batch.core import status as st
from mumic_batch.core.decode import decode_image
from mumic_batch.core.preprocess import preprocess
from mumic_batch.io.fetch import Fetcher
from mumic_batch.model.predictor import Predictor

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0

OUTPUT_COLUMNS = (
    "image_id", "uri", "source_updated_at", "status", "error", "probs", "labels", "zero_shot_probs",
    "zero_shot_labels", "embedding", "content_sha256", "width", "height", "fetch_ms", "decode_ms", "infer_ms",
)


@dataclass
class Prepared:
    """One row after fetch, decode and preprocess (pixels is None unless status is ok)."""

    status: str
    error: str | None = None
    pixels: np.ndarray | None = None
    content_sha256: str | None = None
    width: int | None = None
    height: int | None = None
    fetch_ms: float = 0.0
    decode_ms: float = 0.0


class InferenceEngine:
    """Scores image URIs with one Predictor; create once per Python worker."""

    def __init__(self, predictor: Predictor, fetcher: Fetcher, decode_cfg: DecodeCfg, infer_cfg: InferCfg,
                 threads: int) -> None:
        self.predictor = predictor
        self.fetcher = fetcher
        self.decode_cfg = decode_cfg
        self.infer_cfg = infer_cfg
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mumic-fetch")
        self._trained_idx = [i for i, c in enumerate(predictor.classes) if not c.zero_shot]
        self._zero_idx = [i for i, c in enumerate(predictor.classes) if c.zero_shot]
        self._names = [c.name for c in predictor.classes]
        self._thresholds = np.array([c.threshold for c in predictor.classes], dtype=np.float32)
        log.info("engine ready: %d classes (%d zero-shot), %d fetch threads",
                 len(self._names), len(self._zero_idx), threads)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.fetcher.close()

    def prepare(self, uri: str | None) -> Prepared:
        """Fetch, decode and preprocess one URI; every failure becomes a status, never an exception."""
        started = time.perf_counter()
        fetched = None
        try:
            if not uri:
                raise st.ImageError(st.BAD_URI, "empty uri")
            data = self.fetcher.fetch(uri)
            fetched = time.perf_counter()
            decoded = decode_image(data, self.decode_cfg, target_size=self.predictor.spec.size)
            pixels = preprocess(decoded.image, self.predictor.spec)
        except st.ImageError as err:
            return _failed(err.status, err.message, started, fetched)
        except Exception as err:  # noqa: BLE001 - per-row code must never drop or fail a row
            log.warning("internal error on %s: %r", uri, err)
            return _failed(st.INTERNAL_ERROR, f"{type(err).__name__}: {err}", started, fetched)
        return Prepared(
            st.OK, None, pixels, hashlib.sha256(data).hexdigest(), decoded.width, decoded.height,
            fetch_ms=(fetched - started) * 1000.0, decode_ms=_ms(fetched),
        )

    def submit(self, frame: pd.DataFrame) -> list[Future[Prepared]]:
        """Start preparing every row of a frame on the thread pool."""
        return [self.pool.submit(self.prepare, uri) for uri in frame["uri"]]

    def finish(self, frame: pd.DataFrame, futures: list[Future[Prepared]]) -> pd.DataFrame:
        """Wait for a frame's rows, score the good ones in model batches, build the output frame."""
        prepared = [f.result() for f in futures]
        ok = [i for i, p in enumerate(prepared) if p.status == st.OK]
        probs = np.zeros((len(prepared), len(self._names)), dtype=np.float32)
        emb: dict[int, np.ndarray] = {}
        infer_ms = 0.0
        for start in range(0, len(ok), self.infer_cfg.batch_size):
            chunk = ok[start:start + self.infer_cfg.batch_size]
            t0 = time.perf_counter()
            chunk_probs, chunk_emb = self.predictor.predict(np.stack([prepared[i].pixels for i in chunk]))
            infer_ms += _ms(t0)
            probs[chunk] = chunk_probs
            emb.update(zip(chunk, chunk_emb))
        per_row_infer = infer_ms / max(len(ok), 1)
        return self._output(frame, prepared, probs, emb, per_row_infer)

    def run(self, frames: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """Score a stream of frames, preparing frame k+1 while the model scores frame k."""
        progress = _Progress()
        pending: tuple[pd.DataFrame, list[Future[Prepared]]] | None = None
        for frame in frames:
            current = (frame, self.submit(frame))
            if pending is not None:
                yield progress.seen(self.finish(*pending))
            pending = current
        if pending is not None:
            yield progress.seen(self.finish(*pending))
        progress.report(final=True)

    def _output(self, frame: pd.DataFrame, prepared: list[Prepared], probs: np.ndarray,
                emb: dict[int, np.ndarray], per_row_infer: float) -> pd.DataFrame:
        rows = []
        for i, p in enumerate(prepared):
            good = p.status == st.OK
            rows.append({
                "status": p.status,
                "error": p.error,
                "probs": self._prob_map(probs[i], self._trained_idx) if good else None,
                "labels": self._labels(probs[i], self._trained_idx) if good else None,
                "zero_shot_probs": self._prob_map(probs[i], self._zero_idx) if good else None,
                "zero_shot_labels": self._labels(probs[i], self._zero_idx) if good else None,
                "embedding": emb[i].astype(np.float32).tolist() if good else None,
                "content_sha256": p.content_sha256,
                "width": p.width,
                "height": p.height,
                "fetch_ms": p.fetch_ms,
                "decode_ms": p.decode_ms,
                "infer_ms": per_row_infer if good else 0.0,
            })
        out = pd.DataFrame(rows, index=frame.index, columns=list(OUTPUT_COLUMNS[3:]))
        out.insert(0, "image_id", frame["image_id"].to_numpy())
        out.insert(1, "uri", frame["uri"].to_numpy())
        out.insert(2, "source_updated_at", frame["source_updated_at"].to_numpy()
                   if "source_updated_at" in frame else pd.NaT)
        out["width"] = out["width"].astype("Int32")
        out["height"] = out["height"].astype("Int32")
        return out.reset_index(drop=True)[list(OUTPUT_COLUMNS)]

    def _prob_map(self, row: np.ndarray, idx: list[int]) -> dict[str, float]:
        return {self._names[j]: float(row[j]) for j in idx}

    def _labels(self, row: np.ndarray, idx: list[int]) -> list[str]:
        return [self._names[j] for j in idx if row[j] >= self._thresholds[j]]


class _Progress:
    """Logs how far a stream of frames got: every PROGRESS_EVERY_S seconds, and at the end."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.rows = self.ok = 0

    def seen(self, out: pd.DataFrame) -> pd.DataFrame:
        self.rows += len(out)
        self.ok += int((out["status"] == st.OK).sum())
        if time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self.report(final=False)
        return out

    def report(self, final: bool) -> None:
        self.last = time.perf_counter()
        elapsed = max(self.last - self.started, 1e-9)
        log.info("%s %d rows (%d ok) in %.1fs, %.1f rows/s", "scored" if final else "scoring:", self.rows,
                 self.ok, elapsed, self.rows / elapsed)


def _failed(status: str, error: str, started: float, fetched: float | None) -> Prepared:
    if fetched is None:
        return Prepared(status, error, fetch_ms=_ms(started))
    return Prepared(status, error, fetch_ms=(fetched - started) * 1000.0, decode_ms=_ms(fetched))


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0
