#!/usr/bin/env python
"""Feed rate of the inference runner on the CPU: how fast it could feed a GPU, measured without one.

Side by side in one run, on the same generated 640x480 JPEGs, at each worker count W:

1. prepare only: fetch + decode + resize to the model's uint8 input (224 px), W threads, nothing else:
   the CPU work one image costs before the device;
2. prepare in W processes (each returns only a status): what a process pool could reach at best, without
   paying to ship pixels back; the reference for choosing threads or processes;
3. runner, null model: the whole runner (frames of 64 rows, batches built across frames, uint8 host
   batches, Arrow output) with a model that returns outputs of the right shape (512-d embeddings,
   120 classes) at no cost. Its ratio to (1) is the runner's overhead; the gate is >= 0.9.

Then the CPU path's decode + resize per image with torch's uint8 resize (the default) and with Pillow's,
and the output cost per row: building Arrow output batches (OutputBuilder) vs the per-row Python
objects the old engine built (a dict of probabilities and a list per embedding, then pandas).

    python bench/feed_rate.py                 # 600 images, W = 1 and every core
    python bench/feed_rate.py --images 1000 --workers 1 2 4

Logs go to stderr; the table to stdout; the last stdout line is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import cpu_model, machine_line  # noqa: E402
from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg, SampleCfg  # noqa: E402
from mumic_batch.core import status as st  # noqa: E402
from mumic_batch.core.preprocess import PreprocessSpec  # noqa: E402
from mumic_batch.inference.outputs import OutputBuilder, RowMeta  # noqa: E402

log = logging.getLogger("bench.feed_rate")

GATE = 0.9


class NullModel:
    """A BatchModel with outputs of the right shapes and no compute."""

    def __init__(self, size: int, embed_dim: int, n_classes: int) -> None:
        import torch

        self.device = torch.device("cpu")
        self.spec = PreprocessSpec.from_open_clip_defaults(size)
        self.embed_dim = embed_dim
        self.classes = [_Class(f"class_{i:03d}", 0.5, i >= n_classes - 2) for i in range(n_classes)]
        self._probs = torch.full((4096, n_classes), 0.25)
        self._emb = torch.full((4096, embed_dim), 1.0 / embed_dim ** 0.5)

    def score_uint8(self, nhwc):
        n = nhwc.shape[0]
        return self._probs[:n], self._emb[:n]


class _Class:
    def __init__(self, name: str, threshold: float, zero_shot: bool) -> None:
        self.name, self.threshold, self.zero_shot, self.prompt = name, threshold, zero_shot, name
        self.effective_threshold = threshold


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600, help="sample images to generate (default 600)")
    p.add_argument("--workers", type=int, nargs="+", help="worker counts W to measure (default: 1 and all cores)")
    p.add_argument("--size", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--frame-rows", type=int, default=256, help="rows per input frame, as spark.arrow_batch_rows")
    p.add_argument("--min-seconds", type=float, default=4.0, help="repeat each measurement at least this long")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of prepare-only and runner; best kept")
    p.add_argument("--work-dir", help="where the images go (default: a temporary directory)")
    return p.parse_args(argv)


def make_images(work: Path, n: int) -> list[str]:
    from mumic_batch.core.sample import generate_sample

    sample = generate_sample(SampleCfg(out_dir=str(work / "sample"), n_images=n, seed=0))
    return sample.catalogue["uri"].tolist()


def repeat(once, min_seconds: float) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of this process) over passes lasting at least min_seconds."""
    images, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        images += once()
        wall = time.perf_counter() - wall0
        if wall >= min_seconds:
            return images, wall, time.process_time() - cpu0


def preparer(workers: int, size: int):
    from mumic_batch.inference.prepare import Preparer
    from mumic_batch.io.fetch import Fetcher

    return Preparer(Fetcher(FetchCfg(allowed_schemes=("file",))), DecodeCfg(),
                    PreprocessSpec.from_open_clip_defaults(size), workers)


def bench_prepare(uris: list[str], workers: int, size: int, min_seconds: float) -> dict:
    prep = preparer(workers, size)
    with ThreadPoolExecutor(workers) as pool:
        def once() -> int:
            for p in pool.map(prep.prepare, uris):
                assert p.status == st.OK, p.error
            return len(uris)
        return _rate(*repeat(once, min_seconds))


_PROCESS_PREP = None


def _process_status(args: tuple[str, int]) -> str:
    global _PROCESS_PREP
    uri, size = args
    if _PROCESS_PREP is None:
        _PROCESS_PREP = preparer(1, size)
    return _PROCESS_PREP.prepare(uri).status


def bench_processes(uris: list[str], workers: int, size: int, min_seconds: float) -> dict:
    # Spawned, not forked: a child forked after this process ran torch kernels on several threads can
    # deadlock in the OpenMP runtime.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_process_status, [(u, size) for u in uris[:workers * 4]]))  # start the processes

        def once() -> int:
            for s in pool.map(_process_status, [(u, size) for u in uris], chunksize=16):
                assert s == st.OK
            return len(uris)
        images, wall, _ = repeat(once, min_seconds)
    return _rate(images, wall, None)


def bench_runner(uris: list[str], workers: int, args: argparse.Namespace) -> dict:
    from mumic_batch.inference.runner import Runner
    from mumic_batch.io.fetch import Fetcher

    model = NullModel(args.size, args.embed_dim, args.classes)
    infer = InferCfg(batch_size=args.batch_size, device="cpu", decode_workers=workers)
    runner = Runner(model, Fetcher(FetchCfg(allowed_schemes=("file",))), DecodeCfg(), infer, fetch_threads=workers)
    ids = [f"id{i}" for i in range(len(uris))]
    frames = [pa.RecordBatch.from_pydict({"image_id": ids[i:i + args.frame_rows], "uri": uris[i:i + args.frame_rows]})
              for i in range(0, len(uris), args.frame_rows)]

    def once() -> int:
        rows = 0
        for out in runner.run(iter(frames)):
            rows += out.num_rows
        assert rows == len(uris)
        return rows
    try:
        return _rate(*repeat(once, args.min_seconds))
    finally:
        runner.close()


def _rate(images: int, wall: float, cpu: float | None) -> dict:
    return {"images": images, "wall_s": round(wall, 2), "images_per_s": images / wall,
            "cpu_s": None if cpu is None else round(cpu, 2),
            "images_per_cpu_s": None if not cpu else images / cpu}


def output_cost(args: argparse.Namespace, frames: int = 100) -> dict:
    """CPU µs per row (process time, robust to a loaded machine): Arrow output from numpy buffers vs the old
    per-row dicts and lists plus pandas -> Arrow. Probabilities are uniform, so about half the classes are
    labels of every row: more label strings than a real model assigns."""
    rng = np.random.default_rng(0)
    n, c, d = args.frame_rows, args.classes, args.embed_dim
    model = NullModel(args.size, d, c)
    names = [k.name for k in model.classes]
    thresholds = np.full(c, 0.5, np.float32)
    zero = [k.zero_shot for k in model.classes]
    builder = OutputBuilder(names, thresholds, zero)
    probs = rng.random((n, c), dtype=np.float32)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    ok = np.ones(n, bool)
    ok[::16] = False
    frame = pa.RecordBatch.from_pydict({"image_id": [f"id{i}" for i in range(n)], "uri": [f"/x/{i}.jpg" for i in range(n)]})
    meta = RowMeta.empty(n)
    meta.status = ["ok" if g else "not_found" for g in ok]
    meta.content_sha256 = ["0" * 64 if g else None for g in ok]

    started = time.process_time()
    for _ in range(frames):
        builder.build(frame, meta, ok, probs[ok], emb[ok])
    arrow_us = (time.process_time() - started) / (frames * n) * 1e6

    trained = [j for j in range(c) if not zero[j]]
    zs = [j for j in range(c) if zero[j]]
    old_frames = max(frames // 10, 5)
    started = time.process_time()
    for _ in range(old_frames):
        rows = []
        for i in range(n):
            good = bool(ok[i])
            rows.append({
                "status": meta.status[i], "error": None,
                "probs": {names[j]: float(probs[i, j]) for j in trained} if good else None,
                "labels": [names[j] for j in trained if probs[i, j] >= thresholds[j]] if good else None,
                "zero_shot_probs": {names[j]: float(probs[i, j]) for j in zs} if good else None,
                "zero_shot_labels": [names[j] for j in zs if probs[i, j] >= thresholds[j]] if good else None,
                "embedding": emb[i].tolist() if good else None,
            })
        pa.RecordBatch.from_pandas(pd.DataFrame(rows), preserve_index=False)
    old_us = (time.process_time() - started) / (old_frames * n) * 1e6
    return {"arrow_us_per_row": arrow_us, "per_row_objects_us_per_row": old_us}


def resize_cost(uris: list[str], size: int, rounds: int = 3) -> dict:
    """CPU ms per image of the CPU path's decode + resize (one thread, files already read), with torch's
    uint8 resize (the runner's default for open_clip's transform) and with Pillow's, alternated."""
    datas = [Path(u).read_bytes() for u in uris]
    prep = preparer(1, size)
    best = {"torch_ms": float("inf"), "pillow_ms": float("inf")}
    for _ in range(rounds):
        for key, tensor in (("torch_ms", True), ("pillow_ms", False)):
            prep.tensor_resize = tensor
            started = time.process_time()
            for data in datas:
                prep.decode_cpu(data)
            best[key] = min(best[key], (time.process_time() - started) / len(datas) * 1000.0)
    return best


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    workers = args.workers or sorted({1, cores})
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        uris = make_images(Path(tmp), args.images)
        rows = []
        for w in workers:
            procs = bench_processes(uris, w, args.size, args.min_seconds)
            # Alternate the two measurements and keep each one's best round: load from other processes
            # then slows both alike instead of whichever ran in a busy minute.
            rounds = [(bench_prepare(uris, w, args.size, args.min_seconds), bench_runner(uris, w, args))
                      for _ in range(args.rounds)]
            prep = max((a for a, _ in rounds), key=lambda r: r["images_per_s"])
            run = max((b for _, b in rounds), key=lambda r: r["images_per_s"])
            rows.append({"workers": w, "prepare": prep, "processes": procs, "runner": run,
                         "ratio": run["images_per_s"] / prep["images_per_s"]})
        resize = resize_cost(uris, args.size)
    cost = output_cost(args)
    print(machine_line())
    print(f"{args.images} JPEGs 640x480 -> {args.size} px uint8; null model: {args.embed_dim}-d embeddings, "
          f"{args.classes} classes; batch {args.batch_size}, frames of {args.frame_rows}; load {os.getloadavg()[0]:.1f}")
    print()
    print("| W | prepare only, W threads (img/s) | img per CPU-s | prepare in W processes (img/s) | "
          "runner + null model (img/s) | img per CPU-s | runner / prepare |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p, q, n = r["prepare"], r["processes"], r["runner"]
        print(f"| {r['workers']} | {p['images_per_s']:.1f} | {p['images_per_cpu_s']:.1f} | {q['images_per_s']:.1f} | "
              f"{n['images_per_s']:.1f} | {n['images_per_cpu_s']:.1f} | {r['ratio']:.2f} |")
    print()
    print(f"output building, CPU per row ({args.frame_rows}-row frames): Arrow {cost['arrow_us_per_row']:.2f} µs; per-row dicts/lists + pandas->Arrow "
          f"{cost['per_row_objects_us_per_row']:.1f} µs")
    print(f"decode + resize, CPU per image (1 thread): torch uint8 resize {resize['torch_ms']:.2f} ms; Pillow resize "
          f"{resize['pillow_ms']:.2f} ms ({resize['pillow_ms'] / resize['torch_ms']:.2f}x)")
    gate = all(r["ratio"] >= GATE for r in rows) and cost["arrow_us_per_row"] <= 5.0
    print(f"gate (runner >= {GATE}x prepare at every W, output <= 5 µs/row): {'PASS' if gate else 'FAIL'}")
    print(json.dumps({"cpu": cpu_model(), "cores": cores, "rows": rows, "output_cost": cost, "resize": resize,
                      "gate": gate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
