"""The inference runner: frames of URIs in, one output row per input row out, in order, without Spark.

Rows of every incoming frame are fetched and decoded on a thread pool; prepared rows join the
model batch in the order they finish, across frame boundaries, so the model always gets full
batches of `infer.batch_size` and never waits for one frame's stragglers. At most
`batch_size * (prefetch_batches + 1)` rows are being prepared or waiting for the model at once,
which bounds memory. A frame is emitted, as an Arrow record batch, once all its rows are done.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa

from mumic_batch.config import DecodeCfg, InferCfg
from mumic_batch.core import status as st
from mumic_batch.inference.device import BatchModel, DeviceFeeder, Scored
from mumic_batch.inference.outputs import INPUT_COLUMNS, OutputBuilder, RowMeta
from mumic_batch.inference.prepare import Prepared, Preparer
from mumic_batch.io.fetch import Fetcher

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
# Finished rows may wait behind a straggler of an earlier frame; this bounds how many (their
# results are small, but not free).
PENDING_ROWS_FACTOR = 8


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class _Frame:
    """One input frame in flight: its rows' metadata and results, filled as rows finish."""

    def __init__(self, batch: pa.RecordBatch, n_classes: int, dim: int) -> None:
        n = batch.num_rows
        self.batch = batch
        self.uris = batch.column("uri").to_pylist()
        self.meta = RowMeta.empty(n)
        self.ok = np.zeros(n, dtype=bool)
        self.probs = np.zeros((n, n_classes), dtype=np.float32)
        self.emb = np.zeros((n, dim), dtype=np.float32)
        self.remaining = n

    def prepared(self, row: int, p: Prepared) -> None:
        m = self.meta
        m.status[row], m.error[row], m.content_sha256[row] = p.status, p.error, p.content_sha256
        m.width[row], m.height[row], m.fetch_ms[row], m.decode_ms[row] = p.width, p.height, p.fetch_ms, p.decode_ms
        if p.status != st.OK:
            self.remaining -= 1

    def failed(self, row: int, err: st.ImageError) -> None:
        self.meta.status[row], self.meta.error[row], self.meta.content_sha256[row] = err.status, err.message, None
        self.remaining -= 1

    def scored(self, row: int, probs: np.ndarray, emb: np.ndarray, infer_ms: float) -> None:
        self.ok[row] = True
        self.probs[row], self.emb[row], self.meta.infer_ms[row] = probs, emb, infer_ms
        self.remaining -= 1


class Runner:
    """Scores image URIs with one model; create once per Python worker and reuse across tasks."""

    def __init__(self, model: BatchModel, fetcher: Fetcher, decode_cfg: DecodeCfg, infer_cfg: InferCfg,
                 fetch_threads: int) -> None:
        workers = infer_cfg.decode_workers or available_cores()
        self.model = model
        self.fetcher = fetcher
        self.batch_size = infer_cfg.batch_size
        self.max_in_flight = infer_cfg.batch_size * (infer_cfg.prefetch_batches + 1)
        self.preparer = Preparer(fetcher, decode_cfg, model.spec, workers, gpu_jpeg=infer_cfg.decode == "gpu")
        self.pool = ThreadPoolExecutor(max_workers=max(fetch_threads, workers), thread_name_prefix="mumic-prepare")
        self.feeder = DeviceFeeder(model, infer_cfg.batch_size, infer_cfg.prefetch_batches, self._decode_fallback)
        classes = model.classes
        # a class validation could not make reach its precision is never assigned (threshold infinite)
        self.outputs = OutputBuilder([c.name for c in classes], np.array([c.effective_threshold for c in classes]),
                                     [c.zero_shot for c in classes])
        log.info("runner ready: %d classes (%d zero-shot), batch %d, %d batches ahead, %d decode workers, "
                 "%d fetch threads, decode on %s, device %s", len(classes), sum(c.zero_shot for c in classes),
                 self.batch_size, infer_cfg.prefetch_batches, workers, fetch_threads,
                 "the device for JPEGs" if self.preparer.gpu_jpeg else "the CPU", model.device)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.fetcher.close()

    def run(self, frames: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Output batches (inference.outputs.OUTPUT_SCHEMA), one per input frame, in input order."""
        yield from _Stream(self, iter(frames)).run()

    def run_pandas(self, frames: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """The same for pandas frames (columns image_id, uri, optional source_updated_at); maps become dicts."""
        batches = (pa.RecordBatch.from_pandas(f[[c for c in INPUT_COLUMNS if c in f.columns]], preserve_index=False)
                   for f in frames)
        for out in self.run(batches):
            yield out.to_pandas(maps_as_pydicts="strict")

    def _decode_fallback(self, data: bytes) -> np.ndarray:
        return self.preparer.decode_cpu(data)[0]


class _Stream:
    """The state of one `Runner.run` call: frames waiting for rows, the batch being filled, batches on the device."""

    def __init__(self, runner: Runner, frames: Iterator[pa.RecordBatch]) -> None:
        self.r = runner
        self.frames = frames
        self.exhausted = False
        self.pending: deque[_Frame] = deque()  # submitted frames, in input order, not yet emitted
        self.done: queue.SimpleQueue[tuple[_Frame, int, Prepared]] = queue.SimpleQueue()
        self.preparing = 0  # rows on the thread pool
        self.filling: list[tuple[_Frame, int, Prepared]] = []  # ok rows waiting for a model batch
        self.scoring: deque[tuple[Scored, list[tuple[_Frame, int, Prepared]]]] = deque()
        self.unfinished = 0  # rows preparing, filling or scoring
        self.pending_rows = 0
        self.progress = _Progress()

    def run(self) -> Iterator[pa.RecordBatch]:
        while True:
            self._top_up()
            yield from self._emit_ready()
            if self.preparing:
                self._take_prepared(block=not self._batch_ready())
            if self._batch_ready():
                self._launch(self.r.batch_size)
            elif self.preparing == 0 and self.filling and (self.exhausted or self._starved()):
                self._launch(len(self.filling))
            elif self.preparing == 0 and self.scoring:
                self._collect()
            elif self.preparing == 0 and self.exhausted and not self.filling:
                break
        yield from self._emit_ready()
        self.progress.report(final=True)

    def _top_up(self) -> None:
        """Read and submit frames while fewer than max_in_flight rows are unfinished."""
        r = self.r
        while (not self.exhausted and self.unfinished < r.max_in_flight
               and self.pending_rows < PENDING_ROWS_FACTOR * r.max_in_flight):
            batch = next(self.frames, None)
            if batch is None:
                self.exhausted = True
                return
            frame = _Frame(batch, len(r.model.classes), r.model.embed_dim)
            self.pending.append(frame)
            self.pending_rows += batch.num_rows
            self.unfinished += batch.num_rows
            self.preparing += batch.num_rows
            for row, uri in enumerate(frame.uris):
                future = r.pool.submit(r.preparer.prepare, uri)
                future.add_done_callback(lambda f, fr=frame, i=row: self.done.put((fr, i, _outcome(f))))

    def _take_prepared(self, block: bool) -> None:
        """Record rows that finished preparing: failures are done, ok rows join the batch being filled."""
        try:
            item = self.done.get(block=block)
        except queue.Empty:
            return
        while True:
            frame, row, prepared = item
            self.preparing -= 1
            frame.prepared(row, prepared)
            if prepared.status == st.OK:
                self.filling.append(item)
            else:
                self.unfinished -= 1
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                return

    def _batch_ready(self) -> bool:
        return len(self.filling) >= self.r.batch_size

    def _starved(self) -> bool:
        """Nothing more can be read (memory bound) and nothing is on the device: run the partial batch."""
        return not self.scoring

    def _launch(self, n: int) -> None:
        rows, self.filling = self.filling[:n], self.filling[n:]
        pixels = [p.pixels for _, _, p in rows]
        jpegs = [p.jpeg for _, _, p in rows]
        for _, _, p in rows:  # the buffers are in the batch now; do not keep them alive
            p.pixels = p.jpeg = None
        self.scoring.append((self.r.feeder.submit(pixels, jpegs), rows))
        # One batch computes while the next one is assembled and uploaded; older results are collected.
        while len(self.scoring) > 1:
            self._collect()

    def _collect(self) -> None:
        scored, rows = self.scoring.popleft()
        probs, emb, ms = scored.result()
        per_row = ms / max(len(rows) - len(scored.failed), 1)
        j = 0
        for i, (frame, row, _) in enumerate(rows):
            if i in scored.failed:
                frame.failed(row, scored.failed[i])
            else:
                frame.scored(row, probs[j], emb[j], per_row)
                j += 1
        self.unfinished -= len(rows)

    def _emit_ready(self) -> Iterator[pa.RecordBatch]:
        while self.pending and self.pending[0].remaining == 0:
            frame = self.pending.popleft()
            self.pending_rows -= frame.batch.num_rows
            out = self.r.outputs.build(frame.batch, frame.meta, frame.ok, frame.probs[frame.ok], frame.emb[frame.ok])
            yield self.progress.seen(out, int(frame.ok.sum()))


def _outcome(future: Future[Prepared]) -> Prepared:
    """The prepared row; should prepare itself ever raise (it catches everything), the row still comes back."""
    err = future.exception()
    if err is None:
        return future.result()
    log.error("preparing a row raised %r", err)
    return Prepared(st.INTERNAL_ERROR, f"{type(err).__name__}: {err}")


class _Progress:
    """Logs how far a stream got: every PROGRESS_EVERY_S seconds, and at the end."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.rows = self.ok = 0

    def seen(self, out: pa.RecordBatch, ok: int) -> pa.RecordBatch:
        self.rows += out.num_rows
        self.ok += ok
        if time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self.report(final=False)
        return out

    def report(self, final: bool) -> None:
        self.last = time.perf_counter()
        elapsed = max(self.last - self.started, 1e-9)
        log.info("%s %d rows (%d ok) in %.1fs, %.1f rows/s", "scored" if final else "scoring:", self.rows,
                 self.ok, elapsed, self.rows / elapsed)
