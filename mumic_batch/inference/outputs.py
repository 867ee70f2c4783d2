"""The runner's output: one Arrow schema (the only definition of the output columns) and its builder.

tables/schemas.py derives the Spark schema of the tagging UDF from OUTPUT_SCHEMA. Batches are
built from numpy buffers with a handful of Arrow calls per frame: no Python object per
probability, no per-row list for an embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

OUTPUT_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("source_updated_at", TIMESTAMP),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("probs", pa.map_(pa.string(), pa.float32())),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("zero_shot_probs", pa.map_(pa.string(), pa.float32())),
    pa.field("zero_shot_labels", pa.list_(pa.string())),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("content_sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("fetch_ms", pa.float64()),
    pa.field("decode_ms", pa.float64()),
    pa.field("infer_ms", pa.float64()),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
INPUT_COLUMNS = ("image_id", "uri", "source_updated_at")


@dataclass
class RowMeta:
    """Per-row results of fetch and decode for one frame, as arrays in row order."""

    status: list[str]
    error: list[str | None]
    content_sha256: list[str | None]
    width: np.ndarray  # int32, 0 where unknown
    height: np.ndarray  # int32
    fetch_ms: np.ndarray  # float64
    decode_ms: np.ndarray  # float64
    infer_ms: np.ndarray  # float64

    @classmethod
    def empty(cls, n: int) -> RowMeta:
        return cls([""] * n, [None] * n, [None] * n, np.zeros(n, np.int32), np.zeros(n, np.int32),
                   np.zeros(n, np.float64), np.zeros(n, np.float64), np.zeros(n, np.float64))


class OutputBuilder:
    """Builds output record batches for one model's classes (names, thresholds, which are zero-shot)."""

    def __init__(self, names: Sequence[str], thresholds: np.ndarray, zero_shot: Sequence[bool]) -> None:
        zero = np.asarray(zero_shot, dtype=bool)
        self._trained = _ClassGroup(names, thresholds, np.flatnonzero(~zero))
        self._zero = _ClassGroup(names, thresholds, np.flatnonzero(zero))

    def build(self, frame: pa.RecordBatch, meta: RowMeta, ok: np.ndarray, probs: np.ndarray,
              emb: np.ndarray) -> pa.RecordBatch:
        """`frame` holds INPUT_COLUMNS; probs [n_ok, C] and emb [n_ok, D] are the ok rows' results, in row order."""
        failed = pa.array(~ok)
        updated = frame.column("source_updated_at") if "source_updated_at" in frame.schema.names else None
        columns = [
            frame.column("image_id").cast(pa.string()),
            frame.column("uri").cast(pa.string()),
            pa.nulls(frame.num_rows, TIMESTAMP) if updated is None else updated.cast(TIMESTAMP),
            pa.array(meta.status, pa.string()),
            pa.array(meta.error, pa.string()),
            *self._trained.columns(ok, failed, probs),
            *self._zero.columns(ok, failed, probs),
            _embedding(ok, failed, emb),
            pa.array(meta.content_sha256, pa.string()),
            pa.array(meta.width, pa.int32(), mask=~ok),
            pa.array(meta.height, pa.int32(), mask=~ok),
            pa.array(meta.fetch_ms, pa.float64()),
            pa.array(meta.decode_ms, pa.float64()),
            pa.array(meta.infer_ms, pa.float64()),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=OUTPUT_SCHEMA)


def class_columns(names: Sequence[str], thresholds: np.ndarray, ok: np.ndarray,
                  probs: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """Tagging's (probability map, labels) columns for one group of classes, outside a frame build.

    ok [n] marks the rows that have scores (the others get nulls); probs [n_ok, C] holds their
    probabilities in `names` order. jobs/add_labels.py builds its zero-shot columns with this.
    """
    group = _ClassGroup(names, thresholds, np.arange(len(names)))
    return group.columns(ok, pa.array(~ok), probs)


class _ClassGroup:
    """The trained or the zero-shot classes: their map column and their labels column."""

    def __init__(self, names: Sequence[str], thresholds: np.ndarray, idx: np.ndarray) -> None:
        self.idx = idx
        contiguous = idx.size > 0 and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size))
        # The usual layout (trained classes, then zero-shot extras) needs no gather, only a view.
        self.cols = slice(int(idx[0]), int(idx[0]) + idx.size) if contiguous else idx
        self.names = pa.array([names[j] for j in idx], pa.string())
        self.thresholds = np.asarray(thresholds, dtype=np.float32)[idx]
        self._keys = pa.array([], pa.string())  # names repeated for as many rows as seen so far

    def columns(self, ok: np.ndarray, failed: pa.Array, probs: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """(map of class -> probability, list of labels at or above their thresholds) for every row."""
        mine = probs[:, self.cols]
        n_ok, width = mine.shape
        items = pa.array(np.ascontiguousarray(mine, dtype=np.float32).reshape(-1))
        prob_map = pa.MapArray.from_arrays(_offsets(ok, np.full(n_ok, width)), self._keys_for(n_ok), items,
                                           mask=failed)
        above = mine >= self.thresholds
        # Row-major: each row's labels in class order (a 1-d nonzero is 3x faster than the 2-d one).
        cols = (np.flatnonzero(above) % width).astype(np.int32)
        values = self.names.take(cols)
        labels = pa.ListArray.from_arrays(_offsets(ok, above.sum(axis=1)), values, mask=failed)
        return prob_map, labels

    def _keys_for(self, rows: int) -> pa.Array:
        needed = rows * len(self.idx)
        if len(self._keys) < needed:
            self._keys = self.names.take(np.tile(np.arange(len(self.idx), dtype=np.int32), max(rows, 256)))
        return self._keys.slice(0, needed)


def _embedding(ok: np.ndarray, failed: pa.Array, emb: np.ndarray) -> pa.Array:
    n_ok, dim = emb.shape
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return pa.ListArray.from_arrays(_offsets(ok, np.full(n_ok, dim)), values, mask=failed)


def _offsets(ok: np.ndarray, lengths_of_ok: np.ndarray) -> pa.Array:
    """int32 list offsets for all rows: ok rows take their lengths in order, the others are empty (and masked)."""
    lengths = np.zeros(ok.size, dtype=np.int64)
    lengths[ok] = lengths_of_ok
    offsets = np.zeros(ok.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)
