"""Scoring stored embeddings against new classes (jobs/add_labels.py): mapInArrow, numpy in and out.

No image is fetched and no tower runs: the ClassHead (prompt embeddings, temperature, bias) was
built once on the driver and travels pickled with the function.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql.pandas.types import to_arrow_schema

from mumic_batch.tables.schemas import ZERO_SHOT_SCORES


def score_batches(head) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow function: (image_id, run_id, embedding) batches in, ZERO_SHOT_SCORES batches out."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        # Imported on the worker: the driver-side module stays free of the inference package.
        from mumic_batch.inference.outputs import class_columns

        schema = to_arrow_schema(ZERO_SHOT_SCORES)
        for batch in batches:
            ok, embeddings = _embeddings(batch.column("embedding"), head.embed_dim)
            probs, labels = class_columns(head.names, head.thresholds, ok, head.probs(embeddings))
            yield pa.RecordBatch.from_arrays([batch.column("image_id"), batch.column("run_id"), probs, labels],
                                             schema=schema)

    return run


def _embeddings(column: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows that have an embedding [n] bool, their embeddings [n_ok, dim] float32)."""
    ok = column.is_valid().to_numpy(zero_copy_only=False)
    present = column.filter(pa.array(ok))
    lengths = pc.list_value_length(present).to_numpy(zero_copy_only=False)
    if np.any(lengths != dim):
        raise ValueError(f"stored embeddings of size {sorted(set(lengths.tolist()) - {dim})} do not match the "
                         f"model's embedding size {dim}: is tables.predictions from another model?")
    values = present.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ok, values.reshape(len(present), dim)


def with_class_scores(df: DataFrame, head) -> DataFrame:
    """ZERO_SHOT_SCORES for every row of `df` (image_id, run_id, embedding); rows without one get nulls."""
    return df.select("image_id", "run_id", "embedding").mapInArrow(score_batches(head), ZERO_SHOT_SCORES)
