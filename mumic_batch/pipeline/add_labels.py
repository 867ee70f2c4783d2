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

from pyspark.sql import DataFrame, SparkSession

from mumic_batch.config import JobCfg, ZeroShotClassCfg, to_dict
from mumic_batch.pipeline.runs import RunRecord, recorded
from mumic_batch.pipeline.stored import stored_rows
from mumic_batch.spark.rescore import with_class_scores
from mumic_batch.tables.io import delete_if_empty, delete_path, merge_zero_shot, staging_root

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
    if cfg.model.zero_shot_from != "self":
        # Tagging would score these classes from the base model's image embedding, which is not stored.
        raise ValueError(f"model.zero_shot_from={cfg.model.zero_shot_from}: add_labels scores the stored "
                         "embeddings of model.artifact, which tagging does not use for zero-shot classes then; "
                         "set model.zero_shot_from=self, or add the classes to the base model's own tagged rows "
                         "(model.artifact=<base artifact>)")
    path = cfg.tables.predictions
    classes = chosen_classes(cfg.model.zero_shot, cfg.add_labels.classes)
    started = time.perf_counter()
    head, manifest = class_head(cfg.model.artifact, cfg.model.zero_shot, [c.name for c in classes])
    record.model_name, record.model_version = manifest.name, manifest.version
    record.stage_seconds["text"] = time.perf_counter() - started
    stored = stored_rows(spark, path, manifest)
    record.source, record.source_version = path, stored.table_version
    record.status_counts, record.input_rows, record.processed = stored.status_counts, stored.total, stored.ok
    log.info("run %s: scoring %s into %d ok rows of %s (table version %d)", record.run_id, list(head.names),
             stored.ok, manifest.version, stored.table_version)
    staging = f"{staging_root(path)}/{record.run_id}"
    try:
        metrics = _score_and_merge(spark, stored.rows, head, f"{staging}/zero_shot", path, record)
    finally:
        delete_path(spark, staging)
        delete_if_empty(spark, staging_root(path))
    updated = int(metrics.get("numTargetRowsUpdated", 0))
    record.message = (f"added {', '.join(head.names)} to {stored.ok} ok rows of {manifest.version}; "
                      f"{stored.total - updated} rows re-tagged since table version {stored.table_version} "
                      "kept theirs")
    return {"job": JOB, "run_id": record.run_id, "model_version": manifest.version, "classes": list(head.names),
            "input_rows": stored.total, "processed": stored.ok, "updated_rows": updated,
            "rows_per_s": record.images_per_s, "stage_seconds": record.stage_seconds,
            "predictions": path, "runs": cfg.tables.runs}


def class_head(artifact: str, zero_shot: Sequence[ZeroShotClassCfg], names: Sequence[str]):
    """(ClassHead of `names`, manifest): the model loads once here, on CPU in fp32, for its text tower."""
    from mumic_batch.model.predictor import Predictor  # torch only in the jobs that need it

    predictor = Predictor.load(artifact, zero_shot=zero_shot, device="cpu", precision="fp32")
    return predictor.class_head(names), predictor.manifest


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
