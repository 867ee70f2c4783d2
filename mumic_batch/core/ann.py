"""Nearest neighbours over unit-norm embeddings: an HNSW index (usearch; inner product = cosine),
exact search for measuring its recall, and near-duplicate groups.

usearch was chosen by bench/ann.py (docs/benchmarks.md, "Search: which nearest-neighbour index"):
at 10^5 clustered 512-d vectors it matched faiss's and hnswlib's HNSW recall@10 at the same graph
settings, and it memory-maps a saved index, so a query does not read the whole file first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INDEX_FILE = "index.usearch"


@dataclass(frozen=True)
class HnswParams:
    m: int = 32  # graph degree
    ef_construction: int = 200  # candidate list while building
    ef_search: int = 128  # candidate list while searching


def new_index(dim: int, params: HnswParams):
    """An empty index of `dim`-d float32 vectors, scored by inner product."""
    from usearch.index import Index

    return Index(ndim=dim, metric="ip", dtype="f32", connectivity=params.m, expansion_add=params.ef_construction,
                 expansion_search=params.ef_search)


def open_index(path: str, ef_search: int, view: bool = True):
    """A saved index, memory-mapped when `view` (read-only, nothing read until it is searched)."""
    from usearch.index import Index

    index = Index.restore(path, view=view)
    if index is None:
        raise FileNotFoundError(f"no usearch index at {path}")
    index.expansion_search = ef_search  # not stored in the file
    return index


def search(index, queries: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keys [Q, k] int64, cosines [Q, k] float32), best first; -1 and nan where fewer than k exist."""
    queries = np.atleast_2d(queries).astype(np.float32, copy=False)
    keys = np.full((len(queries), k), -1, dtype=np.int64)
    cosines = np.full((len(queries), k), np.nan, dtype=np.float32)
    found = index.search(queries, k, threads=threads)
    if len(queries) == 1:  # usearch answers one query with Matches (only the hits), more with BatchMatches
        keys[0, : len(found.keys)], cosines[0, : len(found.keys)] = found.keys, 1.0 - found.distances
        return keys, cosines
    hit = np.arange(k)[None, :] < found.counts[:, None]
    keys[hit], cosines[hit] = found.keys[hit], 1.0 - found.distances[hit]  # usearch's ip distance is 1 - ip
    return keys, cosines


def vectors(index, keys: np.ndarray) -> np.ndarray:
    """The stored vectors of `keys`, [n, dim] float32 (image-id queries need no table scan)."""
    return np.stack([index.get(int(k), dtype=np.float32) for k in keys]).astype(np.float32)


class ExactTopK:
    """The exact top k by inner product for a fixed set of queries, fed the data batch by batch."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.asarray(queries, dtype=np.float32)
        self.k = k
        self.keys = np.full((len(queries), 0), -1, dtype=np.int64)
        self.scores = np.zeros((len(queries), 0), dtype=np.float32)

    def add(self, keys: np.ndarray, data: np.ndarray) -> None:
        scores = np.concatenate([self.scores, self.queries @ data.T], axis=1)
        all_keys = np.concatenate([self.keys, np.broadcast_to(keys, (len(self.queries), len(keys)))], axis=1)
        if scores.shape[1] > self.k:
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores, all_keys = np.take_along_axis(scores, top, 1), np.take_along_axis(all_keys, top, 1)
        order = np.argsort(-scores, axis=1, kind="stable")
        self.scores, self.keys = np.take_along_axis(scores, order, 1), np.take_along_axis(all_keys, order, 1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Recall@k from cosines [Q, k], best first: the index's (nan where missing) against the exact search's.

    A hit is a result whose cosine reaches the exact k-th best; equal cosines (copies of an image)
    are interchangeable, so comparing keys would count a tie broken the other way as a miss.
    """
    if not len(found):
        return float("nan")
    kth = exact[:, -1:] - 1e-5  # float32 dot products differ in the last bits between BLAS and the index
    return float(np.mean(np.nan_to_num(found, nan=-np.inf) >= kth))


def groups(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the items linked by `pairs` [m, 2] of int keys: (items, component per item)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    items = np.unique(pairs)
    a, b = np.searchsorted(items, pairs[:, 0]), np.searchsorted(items, pairs[:, 1])
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (a, b)), shape=(len(items), len(items)))
    return items, connected_components(graph, directed=False)[1]
