"""New zero-shot classes for rows already tagged, from their stored embeddings (jobs/add_labels.py).

model.artifact's text tower embeds the classes' prompts once, on the driver -> the model version's
rows at a pinned predictions version -> per row, the classes' probabilities from the stored
embedding through the model's temperature and bias (mapInArrow, the same tempered sigmoid and the
same map/labels builder as tagging) -> staged, narrow -> MERGE into predictions keyed by
(image_id, model_version) and guarded by run_id -> runs row. No image is fetched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mumic_batch.config import JobCfg, ZeroShotClassCfg, to_dict
from mumic_batch.core import status as st
from mumic_batch.pipeline.runs import RunRecord, recorded
from mumic_batch.spark.rescore import with_class_scores
from mumic_batch.tables.io import TableError, delete_path, merge_zero_shot, table_exists

log = logging.getLogger(__name__)

JOB = "add_labels"


def run(spark: SparkSession, cfg: JobCfg) -> dict:
    """Score the chosen model.zero_shot classes into every ok row of model.artifact's version."""
    record = RunRecord(JOB, to_dict(cfg))
    return recorded(spark, record, cfg.tables.runs, lambda: _add(spark, cfg, record))


def chosen_classes(zero_shot: Sequence[ZeroShotClassCfg], names: Sequence[str]) -> tuple[ZeroShotClassCfg, ...]:
    """The model.zero_shot entries named in add_labels.classes (all of them when it is empty), in config order."""
    if not zero_shot:
        raise ValueError("model.zero_shot is empty: add the new classes there (name, prompt, threshold), "
                         "the same entries later tagging runs score")
    unknown = sorted(set(names) - {z.name for z in zero_shot})
    if unknown:
        raise ValueError(f"add_labels.classes names {unknown}, which are not in model.zero_shot "
                         f"({[z.name for z in zero_shot]})")
    return tuple(z for z in zero_shot if not names or z.name in names)


def _add(spark: SparkSession, cfg: JobCfg, record: RunRecord) -> dict:
    path = cfg.tables.predictions
    if not table_exists(spark, path):
        raise TableError(f"no predictions table at {path}: tag a model version first (jobs/tag_images.py)")
    classes = chosen_classes(cfg.model.zero_shot, cfg.add_labels.classes)
    started = time.perf_counter()
    head, manifest = class_head(cfg.model.artifact, cfg.model.zero_shot, [c.name for c in classes])
    record.model_name, record.model_version = manifest.name, manifest.version
    record.stage_seconds["text"] = time.perf_counter() - started
    version = DeltaTable.forPath(spark, path).history(1).first()["version"]
    record.source, record.source_version = path, int(version)
    rows = (spark.read.format("delta").option("versionAsOf", version).load(path)
            .where(F.col("model_version") == manifest.version))
    _check_rows(rows, manifest, record)
    log.info("run %s: scoring %s into %d ok rows of %s (table version %d)", record.run_id, list(head.names),
             record.processed, manifest.version, version)
    staging = f"{path.rstrip('/')}__staging/{record.run_id}/zero_shot"
    try:
        metrics = _score_and_merge(spark, rows, head, staging, path, record)
    finally:
        delete_path(spark, staging.rsplit("/", 1)[0])
    updated = int(metrics.get("numTargetRowsUpdated", 0))
    record.message = (f"added {', '.join(head.names)} to {record.processed} ok rows of {manifest.version}; "
                      f"{record.input_rows - updated} rows re-tagged since table version {version} kept theirs")
    return {"job": JOB, "run_id": record.run_id, "model_version": manifest.version, "classes": list(head.names),
            "input_rows": record.input_rows, "processed": record.processed, "updated_rows": updated,
            "rows_per_s": record.images_per_s, "stage_seconds": record.stage_seconds,
            "predictions": path, "runs": cfg.tables.runs}


def class_head(artifact: str, zero_shot: Sequence[ZeroShotClassCfg], names: Sequence[str]):
    """(ClassHead of `names`, manifest): the model loads once here, on CPU in fp32, for its text tower."""
    from mumic_batch.model.predictor import Predictor  # torch only in the jobs that need it

    predictor = Predictor.load(artifact, zero_shot=zero_shot, device="cpu", precision="fp32")
    return predictor.class_head(names), predictor.manifest


def _check_rows(rows: DataFrame, manifest, record: RunRecord) -> None:
    """Counts by status; fails when the version has no rows or its embeddings came from other weights."""
    counts = rows.groupBy("status").agg(F.count(F.lit(1)).alias("n"),
                                        F.collect_set("model_sha256").alias("sha")).collect()
    record.status_counts = {r["status"]: int(r["n"]) for r in counts}
    record.input_rows = sum(record.status_counts.values())
    record.processed = record.status_counts.get(st.OK, 0)
    if not record.processed:
        raise ValueError(f"no ok rows of model version {manifest.version} in the predictions table: tag it first")
    foreign = sorted({s for r in counts for s in r["sha"]} - {manifest.weights_sha256})
    if foreign:
        raise ValueError(f"rows of {manifest.version} were tagged by weights {foreign}, not by the artifact's "
                         f"{manifest.weights_sha256}: their embeddings cannot be scored with this text tower")


def _score_and_merge(spark: SparkSession, rows: DataFrame, head, staging: str, path: str,
                     record: RunRecord) -> dict[str, str]:
    started = time.perf_counter()
    # Staged once: MERGE reads its source twice, and the staged rows are narrow (no embedding).
    with_class_scores(rows, head).write.format("delta").save(staging)
    record.stage_seconds["score"] = time.perf_counter() - started
    started = time.perf_counter()
    metrics = merge_zero_shot(spark, spark.read.format("delta").load(staging), path, record.model_version,
                              head.names)
    record.stage_seconds["write"] = time.perf_counter() - started
    wall = record.stage_seconds["score"] + record.stage_seconds["write"]
    record.images_per_s = record.processed / wall if wall > 0 else None
    log.info("run %s: scored in %.1f s, merged in %.1f s (%s)", record.run_id, record.stage_seconds["score"],
             record.stage_seconds["write"], metrics)
    return metrics
