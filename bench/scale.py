#!/usr/bin/env python
"""What a night and a backfill cost as the catalogue grows (issue 10): selection, scoring and commit
seconds, and bytes rewritten, at several catalogue sizes N, side by side in one run.

For each N it builds once, under --data (default data/bench/scale/<N>), with Spark SQL (no Python
rows): a catalogue Delta table with the change data feed on (N rows, image ids like the project's,
URIs cycling over a few real sample JPEGs), a predictions table already holding an `ok` row per
image for model version `bench-v1` (the project's schema: 512-d embeddings, a probability per
sample class; written through the pipeline's own table code, so with its properties), its retry
table and a runs row that lets the next run read the change feed. Every scenario then runs on a
fresh copy of that base:

  nightly_cdf   1,000 new catalogue rows (--new), the tagging job via the change feed;
  nightly_anti  the same night with no earlier run recorded, so selected by the anti-join;
  retry_night   --retry-pct of the rows failed with `timeout` last night (and sit in the retry table);
  backfill      model version `bench-v2` over all N rows in --chunks chunks: selection and the
                chunk commits of the real pipeline, with the scoring replaced by synthetic scored
                rows (scoring N images on the tiny model is not what this measures).

The nightly scenarios run the real job in this process (tiny untrained model, local[2]); their
phases come from the runs row's stage_seconds (select, score_wall, write). Bytes come from the
commits' operationMetrics. Logs go to stderr; a Markdown table naming the machine goes to stdout,
and the last stdout line is the whole result as JSON.

    nice -n 10 python bench/scale.py --rows 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/scale.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

from mumic_batch.config import JobCfg, SampleCfg, SparkCfg, TagCfg, load_config  # noqa: E402

log = logging.getLogger("bench.scale")

V1, V2 = "bench-v1", "bench-v2"
EMBED_DIM = 512
# Distinct embedding vectors: rows pick one by a hash of their id. Computing 512 floats per row in
# Spark SQL made a 10^7-row build take hours; a 4,096-vector pool keeps the bytes (float columns this
# random get no dictionary encoding) at a fraction of the CPU.
EMBEDDING_POOL = 4096
FILE_ROWS = 250_000  # about 550 MB per file, 40 files at 10^7 rows
STAMP = "2024-01-01 00:00:00"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="catalogue sizes N")
    p.add_argument("--new", type=int, default=1000, help="new catalogue rows in a nightly run (default 1000)")
    p.add_argument("--retry-pct", type=float, default=1.0, help="percent of rows due for retry (default 1)")
    p.add_argument("--chunks", type=int, default=4, help="backfill chunks (default 4)")
    p.add_argument("--scenarios", nargs="*", default=["nightly_cdf", "nightly_anti", "retry_night", "backfill"],
                   help="scenarios to run at every N (none: only build the tables)")
    p.add_argument("--data", default=str(REPO / "data" / "bench" / "scale"), help="cache of the built tables")
    p.add_argument("--work", default="", help="scratch directory for the scenario copies (default: <data>/work)")
    return p.parse_args(argv)


def machine(spark) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}; {cores} cores (load average {load} at the end); "
            f"Spark {spark.version} {spark.sparkContext.master}; python {platform.python_version()}")


# ------------------------------------------------------------------------------------------ tables


def build_base(spark, root: Path, n: int, images: list[str], classes: list[str]) -> None:
    """Catalogue, predictions (one ok row per image for V1), retry and runs tables of N rows."""
    from mumic_batch.tables import retry
    from mumic_batch.tables.io import ensure_predictions

    if (root / "done").exists():
        log.info("reusing the tables of N=%d under %s", n, root)
        return
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    catalogue = catalogue_rows(spark, 0, n, images)
    catalogue.write.format("delta").option("delta.enableChangeDataFeed", "true").save(str(root / "catalogue"))
    retry.ensure_retry(spark, str(root / "predictions"))  # empty: created before the table it follows
    write_predictions(root / "predictions", n, images, classes)
    ensure_predictions(spark, str(root / "predictions"))  # sets the predictions table's properties
    (root / "done").write_text(json.dumps({"rows": n, "seconds": time.perf_counter() - started}))
    log.info("built N=%d in %.0f s", n, time.perf_counter() - started)


def write_predictions(path: Path, n: int, images: list[str], classes: list[str]) -> None:
    """A Delta table of one `ok` prediction per catalogue row (the ids of catalogue_rows), written by delta-rs.

    Spark's Parquet writer spends about a microsecond per array element, so writing 512-d embeddings
    for 10^7 rows through it takes hours on 2 cores; delta-rs writes the same bytes (with file
    statistics) in minutes. Delta 4.0's CONVERT TO DELTA fails on Spark 4.0.1 (NoSuchMethodError).
    """
    import hashlib

    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake
    from pyspark.sql.pandas.types import to_arrow_schema

    from mumic_batch.tables.schemas import PREDICTIONS, PREDICTIONS_PARTITION

    schema = to_arrow_schema(PREDICTIONS)
    rng = np.random.default_rng(0)
    pool = rng.uniform(-1, 1, (EMBEDDING_POOL, EMBED_DIM)).astype(np.float32)
    for start in range(0, n, FILE_ROWS):
        ids = [hashlib.sha1(str(i).encode()).hexdigest()[:16] for i in range(start, min(n, start + FILE_ROWS))]
        rows = len(ids)
        probs = rng.integers(0, 1000, (rows, len(classes))).astype(np.float32) / 1000
        embedding = pool[rng.integers(0, EMBEDDING_POOL, rows)].ravel()
        columns = {
            "image_id": ids, "uri": [images[i % len(images)] for i in range(start, start + rows)],
            "source_updated_at": _stamps(rows), "status": pa.array(["ok"] * rows), "error": pa.nulls(rows, pa.string()),
            "probs": pa.MapArray.from_arrays(np.arange(rows + 1, dtype=np.int32) * len(classes),
                                             pa.array(classes * rows), pa.array(probs.ravel())),
            "labels": pa.array([classes[:3]] * rows),
            "zero_shot_probs": pa.MapArray.from_arrays(np.zeros(rows + 1, dtype=np.int32), pa.array([], pa.string()),
                                                       pa.array([], pa.float32())),
            "zero_shot_labels": pa.array([[]] * rows, pa.list_(pa.string())),
            "embedding": pa.ListArray.from_arrays(np.arange(rows + 1, dtype=np.int32) * EMBED_DIM, embedding),
            "content_sha256": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
            "width": np.full(rows, 640, np.int32), "height": np.full(rows, 480, np.int32),
            "model_name": ["bench"] * rows, PREDICTIONS_PARTITION: [V1] * rows, "model_sha256": ["0" * 64] * rows,
            "attempts": np.ones(rows, np.int32), "run_id": ["bench-build"] * rows, "tagged_at": _stamps(rows),
        }
        table = pa.Table.from_arrays([pa.array(columns[f.name], f.type) if not isinstance(columns[f.name], pa.Array)
                                      else columns[f.name].cast(f.type) for f in schema], schema=schema)
        write_deltalake(str(path), table, mode="append", partition_by=[PREDICTIONS_PARTITION])
        log.info("wrote prediction rows %d..%d of %d", start, start + rows, n)


def _stamps(rows: int):
    import pyarrow as pa

    return pa.array([datetime.fromisoformat(STAMP).replace(tzinfo=timezone.utc)] * rows,
                    pa.timestamp("us", tz="UTC"))


def catalogue_rows(spark, start: int, n: int, images: list[str]):
    uris = "array(" + ", ".join(f"'{u}'" for u in images) + ")"
    return spark.range(start, start + n).selectExpr(
        "substring(sha1(cast(id AS string)), 1, 16) AS image_id",
        f"element_at({uris}, cast(pmod(id, {len(images)}) AS int) + 1) AS uri",
        f"timestamp'{STAMP}' AS updated_at",
    )


def predictions(spark, catalogue, classes: list[str], version: str, status: str = "ok"):
    """Prediction rows for the catalogue rows, with the PREDICTIONS schema and realistic sizes."""
    from mumic_batch.tables.schemas import PREDICTIONS

    from pyspark.sql import functions as F

    names = "array(" + ", ".join(f"'{c}'" for c in classes) + ")"
    pool = spark.range(EMBEDDING_POOL).selectExpr(
        "id AS slot", f"transform(sequence(0, {EMBED_DIM - 1}), i -> CAST(hash(id, i) / 2147483648.0 AS float)) AS embedding")
    catalogue = (catalogue.withColumn("slot", F.expr(f"pmod(hash(image_id), {EMBEDDING_POOL})"))
                 .join(F.broadcast(pool), "slot"))
    df = catalogue.selectExpr(
        "image_id", "uri", "updated_at AS source_updated_at", f"'{status}' AS status", "CAST(NULL AS string) AS error",
        f"map_from_arrays({names}, transform({names}, c -> CAST(abs(hash(image_id, c)) % 1000 / 1000.0 AS float)))"
        " AS probs",
        f"slice({names}, 1, 3) AS labels",
        "map_from_arrays(CAST(array() AS array<string>), CAST(array() AS array<float>)) AS zero_shot_probs",
        "CAST(array() AS array<string>) AS zero_shot_labels",
        "embedding",
        "sha2(image_id, 256) AS content_sha256", "640 AS width", "480 AS height",
        "'bench' AS model_name", f"'{version}' AS model_version", "repeat('0', 64) AS model_sha256",
        "1 AS attempts", "'bench-build' AS run_id", f"timestamp'{STAMP}' AS tagged_at",
    )
    return df.select(*[df[f.name].cast(f.dataType).alias(f.name) for f in PREDICTIONS.fields])


def copy_base(spark, base: Path, work: Path, recorded: bool = True) -> Path:
    """A scratch copy of the base tables; `recorded`: with a runs row of an earlier successful V1 run."""
    from mumic_batch.pipeline.runs import RunRecord, write_run

    shutil.rmtree(work, ignore_errors=True)
    # The two big tables are shallow clones (their files stay in `base`): a 10^7-row predictions
    # table is ~22 GB, and a full copy per scenario would cost more disk and time than the night.
    work.mkdir(parents=True)
    for entry in base.iterdir():
        if entry.name in ("catalogue", "predictions"):
            spark.sql(f"CREATE TABLE delta.`{work / entry.name}` SHALLOW CLONE delta.`{entry}`")
        elif entry.is_dir():
            shutil.copytree(entry, work / entry.name)
    if recorded:
        record = RunRecord("tag_images", {}, model_version=V1, source=str(work / "catalogue"), source_version=0)
        write_run(spark, record, str(work / "runs"), "succeeded")
    return work


# ---------------------------------------------------------------------------------------- scenarios


def job_cfg(work: Path, artifact: Path, spark_cfg: SparkCfg, **tag: Any) -> JobCfg:
    sets = [f"tables.catalogue={work / 'catalogue'}", f"tables.predictions={work / 'predictions'}",
            f"tables.runs={work / 'runs'}", f"model.artifact={artifact}", "fetch.allowed_schemes=[file]",
            "fetch.local_roots=[]", "infer.batch_size=32", "model.zero_shot=[]"]
    sets += [f"tag.{k}={v}" for k, v in tag.items()]
    cfg = load_config(None, sets)
    return JobCfg(**{**cfg.__dict__, "spark": spark_cfg})


def commits_since(spark, path: Path, version: int) -> list[dict]:
    from delta.tables import DeltaTable

    rows = DeltaTable.forPath(spark, str(path)).history().where(f"version > {version}").collect()
    return [{"operation": r["operation"], **{k: int(v) for k, v in (r["operationMetrics"] or {}).items()}}
            for r in rows]


def table_version(spark, path: Path) -> int:
    from delta.tables import DeltaTable

    return int(DeltaTable.forPath(spark, str(path)).history(1).first()["version"])


def partition_bytes(spark, path: Path, version: str) -> int:
    """Bytes of the live files of one model version's partition (from the Delta log)."""
    from delta.tables import DeltaTable

    detail = DeltaTable.forPath(spark, str(path)).detail().first()
    if version == V1:
        return int(detail["sizeInBytes"])  # the base table holds one partition
    raise ValueError(version)


def rewritten(commits: list[dict]) -> tuple[int, int]:
    """(bytes of files removed, bytes of files added) over the commits (what was rewritten or written)."""
    removed = sum(c.get("numTargetBytesRemoved", c.get("numRemovedBytes", 0)) for c in commits)
    added = sum(c.get("numTargetBytesAdded", c.get("numOutputBytes", c.get("numAddedBytes", 0))) for c in commits)
    return removed, added


def nightly(spark, base: Path, work: Path, artifact: Path, spark_cfg: SparkCfg, n: int, new: int,
            images: list[str], change_feed: bool) -> dict:
    from mumic_batch.pipeline import tag

    # Without an earlier run recorded, the anti-join selects.
    work = copy_base(spark, base, work, recorded=change_feed)
    catalogue_rows(spark, n, new, images).write.format("delta").mode("append").save(str(work / "catalogue"))
    before = table_version(spark, work / "predictions")
    size = partition_bytes(spark, work / "predictions", V1)
    summary = tag.run(spark, job_cfg(work, artifact, spark_cfg))
    return result(spark, work, summary, before, size)


def retry_night(spark, base: Path, work: Path, artifact: Path, spark_cfg: SparkCfg, pct: float) -> dict:
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from mumic_batch.pipeline import tag
    from mumic_batch.tables import retry

    work = copy_base(spark, base, work)
    preds = str(work / "predictions")
    failed = F.abs(F.hash("image_id")) % 10_000 < int(pct * 100)
    DeltaTable.forPath(spark, preds).update(failed, {"status": F.lit("timeout"), "tagged_at": F.lit(STAMP)})
    retry.add_failures(spark, preds, spark.read.format("delta").load(preds).where(failed), 3)
    before = table_version(spark, work / "predictions")
    size = partition_bytes(spark, work / "predictions", V1)
    summary = tag.run(spark, job_cfg(work, artifact, spark_cfg))
    return result(spark, work, summary, before, size)


def result(spark, work: Path, summary: dict, before: int, size: int) -> dict:
    run = spark.read.format("delta").load(str(work / "runs")).where(f"run_id = '{summary['run_id']}'").first()
    stages = dict(run["stage_seconds"] or {})
    removed, added = rewritten(commits_since(spark, work / "predictions", before))
    return {
        "selection": summary["selection"], "processed": summary["processed"],
        "select_s": stages.get("select", 0.0), "score_s": stages.get("score_wall", 0.0),
        "commit_s": stages.get("write", 0.0), "partition_bytes": size,
        "bytes_removed": removed, "bytes_added": added,
    }


def backfill(spark, base: Path, work: Path, classes: list[str], n: int, chunks: int) -> dict:
    """Backfill V2 over the catalogue: the pipeline's selection and chunk commits, scoring synthetic."""
    from mumic_batch.config import TablesCfg
    from mumic_batch.pipeline import tag
    from mumic_batch.pipeline.selection import catalogue_version, select_work
    from mumic_batch.tables import retry

    work = copy_base(spark, base, work)
    tables = TablesCfg(catalogue=str(work / "catalogue"), predictions=str(work / "predictions"),
                       runs=str(work / "runs"))
    tag_cfg = TagCfg(chunk_rows=-(-n // chunks))
    before = table_version(spark, work / "predictions")
    started = time.perf_counter()
    retry.ensure_retry(spark, tables.predictions)
    selection = select_work(spark, tables, tag_cfg, V2, catalogue_version(spark, tables))
    plan = tag._worklist(spark, selection, str(work / "worklist"), tag_cfg)
    select_s = time.perf_counter() - started
    score_s = commit_s = 0.0
    for chunk in plan:
        began = time.perf_counter()
        scored = predictions(spark, chunk.todo.withColumnRenamed("source_updated_at", "updated_at"), classes, V2)
        scored.write.format("delta").save(str(work / f"scored-{chunk.number}"))
        score_s += time.perf_counter() - began
        # the tagging job knows its statuses from the chunk's stats, read after scoring
        statuses = [r["status"] for r in spark.read.format("delta").load(str(work / f"scored-{chunk.number}"))
                    .select("status").distinct().collect()]
        began = time.perf_counter()
        tag.commit_chunk(spark, tables.predictions, tag_cfg, "bench-backfill", V2, chunk,
                         str(work / f"scored-{chunk.number}"), statuses)
        commit_s += time.perf_counter() - began
    removed, added = rewritten(commits_since(spark, work / "predictions", before))
    return {"selection": selection.method, "processed": sum(c.rows for c in plan), "chunks": len(plan),
            "select_s": select_s, "score_s": score_s, "commit_s": commit_s,
            "partition_bytes": added, "bytes_removed": removed, "bytes_added": added}


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from mumic_batch.core.sample import CLASS_NAMES, generate_sample
    from mumic_batch.pipeline.init_model import run as init_model
    from mumic_batch.spark.session import build_session

    data = Path(args.data)
    work_root = Path(args.work) if args.work else data / "work"
    sample = generate_sample(SampleCfg(out_dir=str(data / "sample"), n_images=24, seed=10))
    images = [str(Path(u).resolve()) for u in sample.catalogue["uri"]]
    artifact = data / "model"
    if not artifact.exists():
        init_model(load_config(None, [f"init_model.version={V1}", "init_model.name=bench"]).init_model, str(artifact))
    spark_cfg = SparkCfg(master="local[2]", driver_memory="4g", shuffle_partitions=4, arrow_batch_rows=64,
                         conf={"spark.ui.enabled": "false"})
    spark = build_session(spark_cfg, "bench-scale")
    results: list[dict] = []
    for n in args.rows:
        base = data / str(n)
        build_base(spark, base, n, images, list(CLASS_NAMES))
        for scenario in args.scenarios:
            log.info("N=%d: %s", n, scenario)
            work = work_root / f"{n}-{scenario}"
            if scenario == "nightly_cdf":
                row = nightly(spark, base, work, artifact, spark_cfg, n, args.new, images, True)
            elif scenario == "nightly_anti":
                row = nightly(spark, base, work, artifact, spark_cfg, n, args.new, images, False)
            elif scenario == "retry_night":
                row = retry_night(spark, base, work, artifact, spark_cfg, args.retry_pct)
            elif scenario == "backfill":
                row = backfill(spark, base, work, list(CLASS_NAMES), n, args.chunks)
            else:
                raise SystemExit(f"unknown scenario {scenario!r}")
            shutil.rmtree(work, ignore_errors=True)
            print(json.dumps({"rows": n, "scenario": scenario, **row}), file=sys.stderr, flush=True)
            results.append({"rows": n, "scenario": scenario, **row})
            log.info("N=%d %s: %s", n, scenario, row)
    print(f"machine: {machine(spark)}\n")
    print("| N | scenario | selected by | rows processed | selection s | scoring s | commit s | selection + commit s "
          "| bytes removed | bytes added | partition bytes | rewritten % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        pct = 100.0 * r["bytes_removed"] / r["partition_bytes"] if r["partition_bytes"] else 0.0
        print(f"| {r['rows']:,} | {r['scenario']} | {r['selection']} | {r['processed']:,} | {r['select_s']:.1f} | "
              f"{r['score_s']:.1f} | {r['commit_s']:.1f} | {r['select_s'] + r['commit_s']:.1f} | "
              f"{r['bytes_removed'] / 1e6:.1f} MB | {r['bytes_added'] / 1e6:.1f} MB | {r['partition_bytes'] / 1e6:.0f} MB "
              f"| {pct:.2f} |")
    print(json.dumps({"machine": machine(spark), "results": results}))
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
