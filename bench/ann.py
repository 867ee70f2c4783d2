#!/usr/bin/env python
"""Which approximate nearest-neighbour library the search job uses: recall@10 against exact search,
build time, query rate and index size, side by side in one run on synthetic embeddings.

The vectors imitate image embeddings: unit-norm, 512-d, drawn around --clusters centres (real
catalogue embeddings are clustered too; uniform random vectors are the worst case of every index
and say little). Queries are other vectors from the same mixture. Exact search is a numpy matrix
product over all vectors; recall@10 is the share of the exact top 10 that the index returns.

Candidates, all inner product on unit vectors (= cosine), each built once and searched with two
search-time settings (ef: HNSW's candidate list; nprobe: IVF lists visited):
  faiss HNSW32     faiss-cpu IndexHNSWFlat, M=32, efConstruction=200
  faiss IVFFlat    faiss-cpu IndexIVFFlat, nlist = 4 sqrt(N) (the base of IVF-PQ at 10^8+ rows)
  hnswlib M32      hnswlib, M=32, ef_construction=200
  usearch M32      usearch Index, connectivity=32, expansion_add=200, f32 and i8 storage

Libraries not installed are reported as missing. Logs go to stderr; a Markdown table naming the
machine goes to stdout; the last stdout line is every number as JSON.

    python bench/ann.py --rows 100000 --queries 1000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/ann.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

from bench.machine import machine_line  # noqa: E402

log = logging.getLogger("bench.ann")
K = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000], help="index sizes N")
    p.add_argument("--dim", type=int, default=512, help="embedding size (default 512)")
    p.add_argument("--queries", type=int, default=1000, help="query vectors (default 1000)")
    p.add_argument("--clusters", type=int, default=1000, help="mixture centres (default 1000)")
    p.add_argument("--spread", type=float, default=0.8, help="noise norm around a centre, relative (default 0.8)")
    p.add_argument("--threads", type=int, default=2, help="threads for build and query (default 2)")
    p.add_argument("--only", nargs="*", default=[], help="candidate names to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic(n: int, queries: int, dim: int, clusters: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `clusters` random centres: (data [n, dim], queries [queries, dim]) float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        noise = rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        x = centres[rng.integers(0, clusters, m)] + noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n), draw(queries)


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Row indices of the k largest inner products per query, best first (the ground truth)."""
    scores = queries @ data.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


# Each candidate: build(data, threads) -> (search(queries, k, setting) -> ids [Q, k], save(path)), plus the
# search-time settings tried on the one built index (ef or nprobe).
Search = Callable[[np.ndarray, int, int], np.ndarray]


def faiss_hnsw(m: int, ef_construction: int):
    def build(data: np.ndarray, threads: int):
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexHNSWFlat(data.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(data)

        def search(q: np.ndarray, k: int, ef: int) -> np.ndarray:
            index.hnsw.efSearch = ef
            return index.search(q, k)[1]

        return search, lambda path: faiss.write_index(index, path)

    return build


def faiss_ivf(data_per_list: int = 64):
    def build(data: np.ndarray, threads: int):
        import faiss

        faiss.omp_set_num_threads(threads)
        nlist = int(4 * np.sqrt(len(data)))
        quantizer = faiss.IndexFlatIP(data.shape[1])
        index = faiss.IndexIVFFlat(quantizer, data.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(data[np.random.default_rng(0).permutation(len(data))[: data_per_list * nlist]])
        index.add(data)

        def search(q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
            index.nprobe = nprobe
            return index.search(q, k)[1]

        return search, lambda path: faiss.write_index(index, path)

    return build


def hnswlib_hnsw(m: int, ef_construction: int):
    def build(data: np.ndarray, threads: int):
        import hnswlib

        index = hnswlib.Index(space="ip", dim=data.shape[1])
        index.init_index(max_elements=len(data), M=m, ef_construction=ef_construction, random_seed=0)
        index.add_items(data, np.arange(len(data)), num_threads=threads)
        index.set_num_threads(threads)

        def search(q: np.ndarray, k: int, ef: int) -> np.ndarray:
            index.set_ef(ef)
            return index.knn_query(q, k=k)[0].astype(np.int64)

        return search, index.save_index

    return build


def usearch_hnsw(connectivity: int, expansion_add: int, dtype: str):
    def build(data: np.ndarray, threads: int):
        from usearch.index import Index

        index = Index(ndim=data.shape[1], metric="ip", dtype=dtype, connectivity=connectivity,
                      expansion_add=expansion_add)
        index.add(np.arange(len(data)), data, threads=threads)

        def search(q: np.ndarray, k: int, ef: int) -> np.ndarray:
            index.expansion_search = ef
            return index.search(q, k, threads=threads).keys.astype(np.int64)

        return search, index.save

    return build


CANDIDATES = {
    "faiss HNSW32": (faiss_hnsw(32, 200), "ef", (64, 128)),
    "faiss IVFFlat": (faiss_ivf(), "nprobe", (16, 64)),
    "hnswlib M32": (hnswlib_hnsw(32, 200), "ef", (64, 128)),
    "usearch M32 f32": (usearch_hnsw(32, 200, "f32"), "ef", (64, 128)),
    "usearch M32 i8": (usearch_hnsw(32, 200, "i8"), "ef", (64, 128)),
}


def measure(name: str, data: np.ndarray, queries: np.ndarray, truth: np.ndarray, threads: int) -> list[dict]:
    builder, knob, settings = CANDIDATES[name]
    started = time.perf_counter()
    try:
        search, save = builder(data, threads)
    except ImportError as err:
        return [{"name": name, "missing": str(err)}]
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index")
        save(path)
        size = os.path.getsize(path)
    results = []
    for setting in settings:
        started = time.perf_counter()
        found = search(queries, K, setting)
        query_s = time.perf_counter() - started
        results.append({"name": f"{name} {knob}={setting}", "rows": len(data), "build_s": build_s,
                        "queries_per_s": len(queries) / query_s, "recall_at_10": recall(found, truth),
                        "index_mib": size / 2**20})
        log.info("%s", results[-1])
    return results


def exact_rate(data: np.ndarray, queries: np.ndarray) -> float:
    """Queries/s of exact search by numpy (BLAS) over all vectors, for scale."""
    started = time.perf_counter()
    exact_top_k(data, queries)
    return len(queries) / (time.perf_counter() - started)


def table(results: list[dict], exact: dict[int, float]) -> str:
    lines = ["| index | N | build s | queries/s | recall@10 | index MiB |", "|---|---:|---:|---:|---:|---:|"]
    for n, rate in exact.items():
        lines.append(f"| exact (numpy matmul) | {n} | 0 | {rate:,.0f} | 1.000 | {n * 512 * 4 / 2**20:,.0f} |")
    for r in results:
        if "missing" in r:
            lines.append(f"| {r['name']} | - | not installed | | | |")
            continue
        lines.append(f"| {r['name']} | {r['rows']} | {r['build_s']:.1f} | {r['queries_per_s']:,.0f} | "
                     f"{r['recall_at_10']:.3f} | {r['index_mib']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = args.only or list(CANDIDATES)
    results, exact = [], {}
    for n in args.rows:
        data, queries = synthetic(n, args.queries, args.dim, args.clusters, args.spread, args.seed)
        truth = exact_top_k(data, queries)
        exact[n] = exact_rate(data, queries)
        log.info("N=%d: exact search %.0f queries/s", n, exact[n])
        for name in names:
            results += measure(name, data, queries, truth, args.threads)
    print(machine_line())
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; threads={args.threads}, "
          f"{args.queries} queries, dim={args.dim}, {args.clusters} clusters, spread={args.spread}")
    print(table(results, exact))
    print(json.dumps({"args": vars(args), "exact_queries_per_s": exact, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
