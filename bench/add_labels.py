#!/usr/bin/env python
"""What a new zero-shot class costs: jobs/add_labels.py (stored embeddings, no image fetched) against
tagging the images with the same model, rows per second side by side in one run.

Under --work (default data/bench/add_labels) it writes a small untrained model with the project's
tiny towers but 512-d embeddings (the size of ViT-B-32's; tagging with it is as cheap as tagging
gets: fetch and decode of real 640x480 JPEGs dominate), then runs, in this process on local[2]:

  tag          the tagging pipeline over --images sample images (the rate a re-tag would have);
  add_labels   the add_labels pipeline over those tagged rows, scoring --classes new classes;
  add_labels   the same over --rows synthetic ok rows of the same model version (512-d embeddings,
               the project's schema and table properties), the size where its fixed costs no longer
               dominate.

The rates are the jobs' own: tagging's images_per_s (scoring stage) and add_labels's rows_per_s
(scoring and MERGE), plus each whole run's wall time. Logs go to stderr; a Markdown table naming
the machine goes to stdout; the last stdout line is every number as JSON.

    python bench/add_labels.py --images 300 --rows 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/add_labels.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

from bench.machine import machine_line  # noqa: E402
from mumic_batch.config import JobCfg, SampleCfg, SparkCfg, load_config  # noqa: E402

log = logging.getLogger("bench.add_labels")

VERSION = "bench-labels-v1"
CLASSES = [("pool", "a photo with a pool"), ("volcano", "a photo of a volcano"),
           ("beach", "a photo of a beach")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="sample images tagged (default 300)")
    p.add_argument("--rows", type=int, nargs="*", default=[100_000], help="synthetic predictions rows (default 100000)")
    p.add_argument("--classes", type=int, default=3, choices=range(1, len(CLASSES) + 1), help="new classes (default 3)")
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "add_labels"), help="scratch directory")
    return p.parse_args(argv)


def write_model(path: Path) -> str:
    """An untrained model with the tiny towers and 512-d embeddings; returns its weights' sha256."""
    from mumic_batch.core.sample import CLASS_NAMES
    from mumic_batch.model.artifact import create_untrained_artifact
    from mumic_batch.model.manifest import ClassEntry
    from mumic_batch.model.backbone import TINY_ARCH

    arch = {**TINY_ARCH, "embed_dim": 512}
    classes = [ClassEntry(c, f"a photo with {c}") for c in CLASS_NAMES]
    return create_untrained_artifact(path, arch, classes, name="bench", version=VERSION, seed=0, init_bias=-2.0,
                                     overwrite=True).weights_sha256


def cfg_for(work: Path, artifact: Path, spark_cfg: SparkCfg, classes: int) -> JobCfg:
    zero_shot = ", ".join(f"{{name: {n}, prompt: {p}}}" for n, p in CLASSES[:classes])
    cfg = load_config(None, [f"tables.catalogue={work / 'catalogue'}", f"tables.predictions={work / 'predictions'}",
                             f"tables.runs={work / 'runs'}", f"model.artifact={artifact}",
                             "fetch.allowed_schemes=[file]", "infer.batch_size=32", f"model.zero_shot=[{zero_shot}]"])
    return JobCfg(**{**cfg.__dict__, "spark": spark_cfg})


def tag_sample(spark, work: Path, artifact: Path, spark_cfg: SparkCfg, images: int) -> dict:
    from mumic_batch.core.sample import generate_sample
    from mumic_batch.pipeline import tag
    from mumic_batch.pipeline.sample import CATALOGUE

    sample = generate_sample(SampleCfg(out_dir=str(work / "sample"), n_images=images, seed=3))
    rows = [(r.image_id, str(Path(r.uri).resolve()), r.updated_at.to_pydatetime())
            for r in sample.catalogue.itertuples(index=False)]
    spark.createDataFrame(rows, CATALOGUE).write.format("delta").save(str(work / "catalogue"))
    cfg = cfg_for(work, artifact, spark_cfg, 0)  # tagged without the classes add_labels adds
    started = time.perf_counter()
    summary = tag.run(spark, cfg)
    return {"job": "tag_images", "rows": summary["processed"], "wall_s": time.perf_counter() - started,
            "rows_per_s": summary["images_per_s"]}


def synthetic_rows(spark, work: Path, n: int, sha: str) -> None:
    """N ok rows of VERSION with unit-norm 512-d embeddings, in a fresh predictions table."""
    from pyspark.sql import functions as F

    from bench.scale import catalogue_rows, predictions
    from mumic_batch.tables.io import ensure_predictions

    rows = predictions(spark, catalogue_rows(spark, 0, n, ["/nowhere.jpg"]), ["a", "b"], VERSION)
    # +-1/sqrt(512) by the sign of a hash: unit-norm with no per-row aggregate (Spark would inline a
    # norm column into the per-element lambda and compute it 512 times a row)
    unit = F.expr("transform(sequence(0, 511), i -> CAST(IF(hash(image_id, i) % 2 = 0, 1, -1) / sqrt(512D) AS float))")
    rows = (rows.withColumn("embedding", unit).withColumn("model_sha256", F.lit(sha))
            .withColumn("model_name", F.lit("bench")))
    ensure_predictions(spark, str(work / "predictions"))
    rows.write.format("delta").mode("append").save(str(work / "predictions"))


def add(spark, work: Path, artifact: Path, spark_cfg: SparkCfg, classes: int) -> dict:
    from mumic_batch.pipeline import add_labels

    started = time.perf_counter()
    summary = add_labels.run(spark, cfg_for(work, artifact, spark_cfg, classes))
    return {"job": "add_labels", "rows": summary["processed"], "wall_s": time.perf_counter() - started,
            "rows_per_s": summary["rows_per_s"], "stage_seconds": summary["stage_seconds"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from mumic_batch.spark.session import build_session

    root = Path(args.work)
    shutil.rmtree(root, ignore_errors=True)
    artifact = root / "model"
    sha = write_model(artifact)
    spark_cfg = SparkCfg(master="local[2]", driver_memory="4g", shuffle_partitions=4, arrow_batch_rows=256,
                         conf={"spark.ui.enabled": "false"})
    spark = build_session(spark_cfg, "bench-add-labels")
    results = [tag_sample(spark, root / "tagged", artifact, spark_cfg, args.images)]
    results.append(add(spark, root / "tagged", artifact, spark_cfg, args.classes))
    for n in args.rows:
        synthetic_rows(spark, root / str(n), n, sha)
        results.append(add(spark, root / str(n), artifact, spark_cfg, args.classes))
        log.info("%s", results[-1])
    print(machine_line())
    print(f"Spark {spark.version} {spark.sparkContext.master}; load average at the end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.classes} new classes\n")
    print("| job | rows | job's rate (rows/s) | whole run s | whole run rows/s | add_labels stages s |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.get("stage_seconds", {}).items())
        print(f"| {r['job']} | {r['rows']:,} | {r['rows_per_s']:,.1f} | {r['wall_s']:.1f} | "
              f"{r['rows'] / r['wall_s']:,.1f} | {stages} |")
    print(json.dumps({"machine": machine_line(), "args": vars(args), "results": results}))
    spark.stop()
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
