"""Search over a model version's stored embeddings (jobs/search.py).

build (Spark): the version's ok rows at a pinned table version -> (image_id, uri, content_sha256,
embedding) staged as Parquet -> read back on the driver batch by batch: pass 1 adds them to an HNSW
index (keys = row positions, ids.parquet maps them back); pass 2 searches every indexed vector for
near-duplicates and finds the exact neighbours of a sample, for recall -> the index directory
<search.index_dir>/<version>/ swapped in whole -> the duplicates table (replaced for the version)
-> runs row.

query (no Spark): text queries through the model's text tower and image-id queries (the stored
vector of that image), top k with cosine scores, printed and written to a CSV/Parquet/JSON file.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from mumic_batch.config import JobCfg, SearchCfg, to_dict
from mumic_batch.core import ann
from mumic_batch.core import status as st
from mumic_batch.model.manifest import check_artifact
from mumic_batch.pipeline.runs import RunRecord, recorded
from mumic_batch.pipeline.stored import stored_rows
from mumic_batch.tables.io import ensure_delta
from mumic_batch.tables.schemas import DUPLICATES

log = logging.getLogger(__name__)

JOB = "search_index"
IDS_FILE = "ids.parquet"
IDS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("content_sha256", pa.string())])
META_FILE = "meta.json"
BATCH_ROWS = 8192  # rows per batch read back on the driver: 16 MB of 512-d float32


def index_dir(search: SearchCfg, model_version: str) -> Path:
    """The version's index directory."""
    return Path(search.index_dir) / model_version


def run(spark: SparkSession, cfg: JobCfg) -> dict:
    """Build the version's index and its near-duplicate groups; return the run summary."""
    record = RunRecord(JOB, to_dict(cfg))
    return recorded(spark, record, cfg.tables.runs, lambda: _build(spark, cfg, record))


def _build(spark: SparkSession, cfg: JobCfg, record: RunRecord) -> dict:
    manifest = check_artifact(cfg.model.artifact)
    record.model_name, record.model_version = manifest.name, manifest.version
    stored = stored_rows(spark, cfg.tables.predictions, manifest)
    record.source, record.source_version = cfg.tables.predictions, stored.table_version
    record.status_counts, record.input_rows, record.processed = stored.status_counts, stored.total, stored.ok
    target = index_dir(cfg.search, manifest.version)
    work = target.with_name(f"{target.name}.building-{record.run_id}")
    started = time.perf_counter()
    try:
        (stored.rows.where(F.col("status") == st.OK).select("image_id", "uri", "content_sha256", "embedding")
         .write.parquet(str((work / "staging").resolve())))
        record.stage_seconds["stage"] = time.perf_counter() - started
        built = _index(work, manifest.embed_dim, cfg.search, record)
        shutil.rmtree(work / "staging")
        meta = _meta(manifest, cfg, stored.table_version, built, record.run_id)
        (work / META_FILE).write_text(json.dumps(meta, indent=2))
        _swap(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    groups = write_duplicates(spark, cfg.search.duplicates, manifest.version, built.duplicates, record.run_id)
    record.stage_seconds["duplicates"] = time.perf_counter() - started
    index_s = record.stage_seconds["index"]
    record.images_per_s = stored.ok / index_s if index_s > 0 else None
    record.message = (f"indexed {stored.ok} embeddings of {manifest.version}: recall@{cfg.search.top_k} "
                      f"{_fmt(built.recall)} vs exact search on {built.recall_queries} of them; {groups} "
                      "near-duplicate groups")
    log.info("run %s: %s", record.run_id, record.message)
    return {"job": JOB, "run_id": record.run_id, "model_version": manifest.version, "index": str(target),
            "rows": stored.ok, f"recall_at_{cfg.search.top_k}": built.recall, "recall_queries": built.recall_queries,
            "duplicate_groups": groups, "duplicates": cfg.search.duplicates, "stage_seconds": record.stage_seconds,
            "runs": cfg.tables.runs}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class Built:
    rows: int
    recall: float | None
    recall_queries: int
    duplicates: pd.DataFrame  # DUPLICATES columns without model_version, run_id, found_at


def _index(work: Path, dim: int, search: SearchCfg, record: RunRecord) -> Built:
    """Pass 1 builds the index and ids.parquet; pass 2 finds near-duplicates and the exact top k of a sample."""
    started = time.perf_counter()
    index, rows = _add_all(work, dim, search)
    record.stage_seconds["index"] = time.perf_counter() - started
    log.info("run %s: indexed %d vectors in %.1f s", record.run_id, rows, record.stage_seconds["index"])
    started = time.perf_counter()
    sample = np.sort(np.random.default_rng(0).choice(rows, min(rows, search.recall_queries), replace=False))
    exact = ann.ExactTopK(ann.vectors(index, sample), search.top_k + 1)
    pairs, key = [np.zeros((0, 3))], 0
    for _, vectors in _staged(work / "staging", dim):
        keys = np.arange(key, key + len(vectors))
        pairs.append(_near_pairs(index, keys, vectors, search))
        exact.add(keys, vectors)
        key += len(vectors)
    recall = None
    if len(sample):
        found, cosines = ann.search(index, exact.queries, search.top_k + 1, search.threads)
        recall = ann.recall_at_k(_without(found, cosines, sample, search.top_k),
                                 _without(exact.keys, exact.scores, sample, search.top_k))
    record.stage_seconds["neighbours"] = time.perf_counter() - started
    ids = pq.read_table(work / IDS_FILE).to_pandas()
    return Built(rows, recall, len(sample), duplicate_groups(ids, np.concatenate(pairs)))


def _add_all(work: Path, dim: int, search: SearchCfg):
    """(index of every staged vector, saved; row count); ids.parquet maps the keys 0..n-1 to the rows."""
    index = ann.new_index(dim, ann.HnswParams(search.m, search.ef_construction, search.ef_search))
    rows = 0
    with pq.ParquetWriter(work / IDS_FILE, IDS_SCHEMA) as ids:
        for batch, vectors in _staged(work / "staging", dim):
            index.add(np.arange(rows, rows + len(vectors)), vectors, threads=search.threads)
            ids.write_table(pa.Table.from_batches([batch.select(IDS_SCHEMA.names)]).cast(IDS_SCHEMA))
            rows += len(vectors)
    index.save(str(work / ann.INDEX_FILE))
    return index, rows


def _staged(path: Path, dim: int) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """The staged rows in a fixed order (files by name), with their embeddings as [n, dim] float32."""
    for file in sorted(path.glob("*.parquet")):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS):
            values = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
            if values.size != batch.num_rows * dim:
                raise ValueError(f"stored embeddings in {file} are not all of the model's size {dim}")
            yield batch, values.astype(np.float32, copy=False).reshape(batch.num_rows, dim)


def _near_pairs(index, keys: np.ndarray, vectors: np.ndarray, search: SearchCfg) -> np.ndarray:
    """(key, other key, cosine) rows [m, 3] for neighbours at or above search.duplicate_cosine."""
    found, cosines = ann.search(index, vectors, search.duplicate_neighbours + 1, search.threads)
    mine = np.broadcast_to(keys[:, None], found.shape)
    keep = (found >= 0) & (found != mine) & (cosines >= search.duplicate_cosine)
    return np.stack([mine[keep], found[keep], cosines[keep]], axis=1) if keep.any() else np.zeros((0, 3))


def _without(keys: np.ndarray, cosines: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each query's first k cosines, its own key left out (image-id queries leave the image out too)."""
    return np.stack([c[row != key][:k] for row, c, key in zip(keys, cosines, own)])


def duplicate_groups(ids: pd.DataFrame, near: np.ndarray) -> pd.DataFrame:
    """Groups linked by a neighbour pair [m, 3] (key, key, cosine) or a shared content_sha256.

    `ids` has image_id, uri, content_sha256, one row per key. Returns one row per grouped image.
    """
    shared = ids[ids["content_sha256"].notna() & ids.duplicated("content_sha256", keep=False)]
    first = shared.index.to_series().groupby(shared["content_sha256"]).transform("min")
    links = [near[:, :2].astype(np.int64), np.stack([first.to_numpy(), first.index.to_numpy()], axis=1)]
    items, component = ann.groups(np.concatenate(links))
    columns = ["group_id", "group_size", "image_id", "uri", "content_sha256", "same_content", "nearest_id",
               "nearest_cosine"]
    if not len(items):
        return pd.DataFrame(columns=columns)
    rows = ids.iloc[items].reset_index(drop=True).assign(component=component, key=items)
    rows = rows[rows.groupby("component")["key"].transform("size") > 1]
    rows["group_size"] = rows.groupby("component")["key"].transform("size").astype("int32")
    rows["group_id"] = rows.groupby("component")["image_id"].transform("min")
    rows["same_content"] = rows.groupby(["component", "content_sha256"])["key"].transform("size").fillna(1) > 1
    best = pd.DataFrame(near, columns=["key", "other", "cosine"]).sort_values("cosine", ascending=False)
    best = best.drop_duplicates("key").astype({"key": "int64", "other": "int64"})
    rows = rows.merge(best, on="key", how="left")
    rows["nearest_id"] = ids["image_id"].reindex(rows["other"].fillna(-1).astype("int64")).to_numpy()
    rows["nearest_cosine"] = rows["cosine"].astype("float32")
    return rows[columns].sort_values(["group_id", "image_id"]).reset_index(drop=True)


def write_duplicates(spark: SparkSession, path: str, model_version: str, groups: pd.DataFrame, run_id: str) -> int:
    """Replace the version's rows of the duplicates table; returns the number of groups."""
    found_at = datetime.now(timezone.utc)
    rows = [(model_version, r.group_id, int(r.group_size), r.image_id, r.uri, r.content_sha256,
             bool(r.same_content), None if pd.isna(r.nearest_id) else r.nearest_id,
             None if pd.isna(r.nearest_cosine) else float(r.nearest_cosine), run_id, found_at)
            for r in groups.itertuples(index=False)]
    ensure_delta(spark, path, DUPLICATES, ("model_version",))
    version = model_version.replace("'", "''")
    (spark.createDataFrame(rows, DUPLICATES).write.format("delta").mode("overwrite")
     .option("replaceWhere", f"model_version = '{version}'").save(path))
    return int(groups["group_id"].nunique()) if len(groups) else 0


def _meta(manifest, cfg: JobCfg, table_version: int, built: Built, run_id: str) -> dict:
    from importlib.metadata import version

    return {
        "model_name": manifest.name, "model_version": manifest.version, "model_sha256": manifest.weights_sha256,
        "predictions": cfg.tables.predictions, "table_version": table_version, "rows": built.rows,
        "dim": manifest.embed_dim, "library": f"usearch {version('usearch')}", "metric": "cosine",
        "m": cfg.search.m, "ef_construction": cfg.search.ef_construction, "k": cfg.search.top_k,
        "recall_at_k": built.recall, "recall_queries": built.recall_queries, "run_id": run_id,
        "built_at": datetime.now(timezone.utc).isoformat(),
    }


def _swap(work: Path, target: Path) -> None:
    """Put the new index in place; a query that already opened the old one keeps reading it."""
    old = target.with_name(f"{target.name}.old-{work.name}")
    if target.exists():
        target.rename(old)
    work.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ queries


def query(cfg: JobCfg, texts: list[str], image_ids: list[str], k: int) -> list[dict]:
    """Top k images for each text and each image id (itself left out), best first, with cosine scores."""
    if not texts and not image_ids:
        raise ValueError("nothing to search for: give --text 'a photo with a pool' and/or --image-id ID")
    manifest = check_artifact(cfg.model.artifact)
    path = index_dir(cfg.search, manifest.version)
    meta = _read_meta(path, manifest)
    index = ann.open_index(str(path / ann.INDEX_FILE), max(cfg.search.ef_search, k + 1))
    ids = pq.read_table(path / IDS_FILE)
    results = []
    if texts:
        from mumic_batch.model.predictor import Predictor  # torch only when a text is embedded

        queries = Predictor.load(cfg.model.artifact, device="cpu").text_embeddings(texts)
        found, cosines = ann.search(index, queries, k, cfg.search.threads)
        results += _rows("text", texts, found, cosines, ids, meta)
    if image_ids:
        keys = _keys_of(ids, image_ids, path)
        found, cosines = ann.search(index, ann.vectors(index, keys), k + 1, cfg.search.threads)
        own = found != keys[:, None]
        found = np.stack([f[o][:k] for f, o in zip(found, own)])
        cosines = np.stack([c[o][:k] for c, o in zip(cosines, own)])
        results += _rows("image", image_ids, found, cosines, ids, meta)
    return results


def _read_meta(path: Path, manifest) -> dict:
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"no index for model version {manifest.version} at {path}: build it first "
                                "(python -m jobs.search build)")
    meta = json.loads((path / META_FILE).read_text())
    if meta["model_sha256"] != manifest.weights_sha256:
        raise ValueError(f"the index at {path} was built from weights {meta['model_sha256']}, not the artifact's "
                         f"{manifest.weights_sha256}: rebuild it (python -m jobs.search build)")
    return meta


def _keys_of(ids: pa.Table, image_ids: list[str], path: Path) -> np.ndarray:
    positions = pd.Series(np.arange(ids.num_rows), index=ids.column("image_id").to_pandas())
    missing = [i for i in image_ids if i not in positions.index]
    if missing:
        raise KeyError(f"image ids {missing} are not in the index at {path} (not tagged ok by this version, or "
                       "tagged after the index was built)")
    return positions.loc[image_ids].to_numpy().astype(np.int64)


def _rows(kind: str, queries: list[str], found: np.ndarray, cosines: np.ndarray, ids: pa.Table,
          meta: dict) -> list[dict]:
    image_id, uri = ids.column("image_id").to_pylist(), ids.column("uri").to_pylist()
    return [{"query_kind": kind, "query": q, "rank": rank + 1, "image_id": image_id[key], "uri": uri[key],
             "score": round(float(score), 6), "model_version": meta["model_version"]}
            for q, keys, scores in zip(queries, found, cosines)
            for rank, (key, score) in enumerate((k, s) for k, s in zip(keys, scores) if k >= 0)]


def write_results(rows: list[dict], out: str) -> None:
    """The results as CSV, Parquet or JSON (an array of objects), by the file's extension."""
    suffix = Path(out).suffix.lower()
    columns = ["query_kind", "query", "rank", "image_id", "uri", "score", "model_version"]
    frame = pd.DataFrame(rows, columns=columns)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.to_csv(out, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(out, index=False)
    elif suffix == ".json":
        frame.to_json(out, orient="records", indent=1)
    else:
        raise ValueError(f"--out {out}: the extension must be .csv, .parquet or .json")
