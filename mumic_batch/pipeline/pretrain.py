"""Stand-in pretraining: a small open_clip model trained contrastively on the labels table's captions.

This replaces downloading a pretrained CLIP on machines that cannot: the base artifact it writes plays the
role of "pretrained CLIP" for fine-tuning (jobs/train.py) and zero-shot prediction. In production, skip it
and point train.clip_weights at real open_clip weights (docs/learning.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mumic_batch.config import JobCfg, to_dict
from mumic_batch.core import status as st
from mumic_batch.model.artifact import save_artifact
from mumic_batch.model.manifest import ClassEntry
from mumic_batch.model.backbone import named_architecture, preprocess_spec
from mumic_batch.model.images import load_pixels
from mumic_batch.model.mumic import build_mumic
from mumic_batch.model.device import resolve_device
from mumic_batch.model.pretrain import PairSet, pretrain
from mumic_batch.pipeline.labels import read_labels, training_classes
from mumic_batch.pipeline.runs import RunRecord, recorded

log = logging.getLogger(__name__)

JOB = "pretrain"


def run(spark, cfg: JobCfg) -> dict:
    """Pretrain, write the base artifact to pretrain.out, record a runs row; return the job summary."""
    record = RunRecord(JOB, to_dict(cfg), model_name=cfg.pretrain.name, model_version=cfg.pretrain.version,
                       source=cfg.tables.labels)
    return recorded(spark, record, cfg.tables.runs, lambda: _pretrain(spark, cfg, record))


def _pretrain(spark, cfg: JobCfg, record: RunRecord) -> dict:
    pc = cfg.pretrain
    if Path(pc.out).exists() and not pc.overwrite:
        raise FileExistsError(f"artifact already exists: {pc.out} (set pretrain.overwrite=true to replace it)")
    splits = [pc.split] + ([pc.val_split] if pc.val_split else [])
    labels = read_labels(spark, cfg.tables, splits, [pc.caption_column])
    record.source_version, record.input_rows = labels.version, len(labels.frame)
    device = resolve_device(pc.device)
    model = build_mumic(named_architecture(pc.architecture), seed=pc.seed)
    started = time.perf_counter()
    pairs = {name: _pairs(model, labels.split(name), pc.caption_column, cfg, record) for name in splits}
    load_s = time.perf_counter() - started
    if pairs[pc.split].pixels.shape[0] < 2:
        raise ValueError(f"split {pc.split!r} of {cfg.tables.labels} has fewer than 2 usable images")
    val = pairs.get(pc.val_split)
    if val is not None and val.pixels.shape[0] < 2:
        log.warning("validation split %r has fewer than 2 usable images: keeping the last step", pc.val_split)
        val = None
    result = pretrain(model, pairs[pc.split], val, pc, device)
    classes = [ClassEntry(c.name, c.prompt, zero_shot=True) for c in training_classes(cfg.train)]
    manifest = save_artifact(
        pc.out, model, name=pc.name, version=pc.version, classes=classes, overwrite=pc.overwrite,
        training_data=labels.ref(kind="contrastive_pretraining", split=pc.split, val_split=pc.val_split or None,
                                 caption_column=pc.caption_column, rows=int(pairs[pc.split].pixels.shape[0]),
                                 seed=pc.seed, steps=result.steps, kept_step=result.kept_step),
        metrics={"val_clip_loss": result.val_loss},
    )
    record.processed = sum(int(p.pixels.shape[0]) for p in pairs.values())
    record.stage_seconds = {"load": load_s, "train": result.seconds}
    log.info("base model %s %s written to %s (%d steps in %.0fs)", manifest.name, manifest.version, pc.out,
             result.steps, result.seconds)
    return {"job": JOB, "run_id": record.run_id, "model": pc.out, "name": manifest.name, "version": manifest.version,
            "train_pairs": int(pairs[pc.split].pixels.shape[0]), "steps": result.steps,
            "kept_step": result.kept_step, "val_clip_loss": result.val_loss, "seconds": round(result.seconds, 1)}


def _pairs(model, frame, caption_column: str, cfg: JobCfg, record: RunRecord) -> PairSet:
    """Images (through the tagging job's fetch/decode/preprocess) and tokenised captions of one split."""
    loaded = load_pixels(list(frame["uri"]), preprocess_spec(model.backbone), cfg.fetch, cfg.decode, cfg.fetch.threads)
    for status, count in loaded.failures.items():
        record.status_counts[status] = record.status_counts.get(status, 0) + count
    record.status_counts[st.OK] = record.status_counts.get(st.OK, 0) + int(loaded.rows.size)
    captions = [str(frame[caption_column].iloc[i]) for i in loaded.rows]
    return PairSet(pixels=torch.from_numpy(loaded.pixels), tokens=model.tokenize(captions).cpu())
