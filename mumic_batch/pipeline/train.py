"""MuMIC fine-tuning job: labels table -> in-memory images -> tempered-sigmoid training -> versioned artifact.

The artifact's manifest carries the classes and prompts, per-class thresholds chosen on the validation
split (the lowest score reaching train.target_precision there), the validation metrics and a reference
to the training data (table, Delta version, splits, seed, row counts, base model).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mumic_batch.config import ClassPromptCfg, JobCfg, TrainCfg, to_dict
from mumic_batch.core import metrics
from mumic_batch.core import status as st
from mumic_batch.core.calibration import Platt, apply_platt, fit_platt
from mumic_batch.core.preprocess import PreprocessSpec
from mumic_batch.core.thresholds import choose_thresholds
from mumic_batch.model.artifact import load_artifact, save_artifact
from mumic_batch.model.manifest import ClassEntry
from mumic_batch.model.backbone import preprocess_spec
from mumic_batch.model.base import load_base
from mumic_batch.model.images import load_pixels
from mumic_batch.model.mumic import MuMIC
from mumic_batch.model.device import resolve_device
from mumic_batch.model.train import (
    Classifier,
    FitResult,
    LabelledSet,
    fit,
    predict,
    predict_logits,
    tower_weights,
    wise_ft,
)
from mumic_batch.pipeline.labels import LabelsTable, map_class_indices, multi_hot, read_labels, training_classes
from mumic_batch.pipeline.runs import RunRecord, recorded

log = logging.getLogger(__name__)

JOB = "train"
# Settings that change nothing in the trained weights: a checkpoint stays valid when only these differ.
_NOT_IN_FINGERPRINT = ("name", "version", "overwrite", "checkpoint_dir", "checkpoint_every", "resume",
                       "target_precision", "wise_alpha", "threshold_min_support", "threshold_bootstrap",
                       "threshold_shrinkage", "threshold_ci", "calibration", "calibration_min_support")


def run(spark, cfg: JobCfg) -> dict:
    """Fine-tune, write the artifact to model.artifact, record a runs row; return the job summary."""
    record = RunRecord(JOB, to_dict(cfg), model_name=cfg.train.name, source=cfg.tables.labels)
    return recorded(spark, record, cfg.tables.runs, lambda: _train(spark, cfg, record))


def output_dir(cfg: JobCfg) -> str:
    """model.artifact as a local directory: training writes locally, upload the directory to S3 afterwards."""
    out = cfg.model.artifact.removeprefix("file://")
    if "://" in out:
        raise ValueError(f"model.artifact={cfg.model.artifact!r}: training writes a local directory "
                         "(upload it afterwards, e.g. aws s3 cp --recursive); set a local path")
    if Path(out).exists() and not cfg.train.overwrite:
        # Checked before training, not after it: a run should not fail once its work is done.
        raise FileExistsError(f"artifact already exists: {out} (set train.overwrite=true to replace it)")
    return out


def _train(spark, cfg: JobCfg, record: RunRecord) -> dict:
    tc = cfg.train
    out = output_dir(cfg)
    classes = training_classes(tc)
    columns = [tc.label_column] + ([tc.negatives_column] if tc.mask_unannotated else [])
    labels = read_labels(spark, cfg.tables, [tc.train_split, tc.val_split], columns)
    record.source_version, record.input_rows = labels.version, len(labels.frame)
    model, base_ref = load_base(tc)
    started = time.perf_counter()
    spec = preprocess_spec(model.backbone)
    train, _ = _labelled(labels.split(tc.train_split), classes, spec, cfg, record)
    val, val_rows = _labelled(labels.split(tc.val_split), classes, spec, cfg, record)
    _check_data(train, val, tc, cfg.tables.labels)
    record.stage_seconds["load"] = time.perf_counter() - started
    clf = Classifier(model, [c.prompt for c in classes])
    base_towers = tower_weights(model) if tc.wise_alpha < 1.0 else None
    device = resolve_device(tc.device)
    result = fit(clf, train, val, tc, device,
                 checkpoint_dir=tc.checkpoint_dir or f"{out}.ckpt", fingerprint=fingerprint(tc, base_ref, labels))
    if base_towers is not None:
        result = _interpolate(clf, base_towers, val, result, tc, device)
    record.stage_seconds["train"] = result.seconds
    record.processed = int(train.pixels.shape[0] + val.pixels.shape[0])
    version = tc.version or "ft-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record.model_version = version
    entries, val_metrics = _thresholds_and_metrics(clf, classes, val, result, cfg, device)
    zero_shot = _zero_shot_entries(clf.model, val, val_rows, cfg, device)
    zero_shot_base = _base_zero_shot_entries(base_ref, val, val_rows, cfg, device)
    _log_retention(zero_shot, zero_shot_base)
    ref = labels.ref(kind="mumic_fine_tune", split=tc.train_split, val_split=tc.val_split, seed=tc.seed,
                     rows=int(train.pixels.shape[0]), val_rows=int(val.pixels.shape[0]),
                     label_column=tc.label_column, base=base_ref)
    fit_metrics = {"val": val_metrics, **_fit_summary(result), "wise_alpha": tc.wise_alpha,
                   "calibration": tc.calibration, "zero_shot": {e.name: e.to_dict() for e in zero_shot},
                   "zero_shot_base": {e.name: e.to_dict() for e in zero_shot_base},
                   "history": _history(result)}
    manifest = save_artifact(out, clf.model, name=tc.name, version=version, classes=entries, training_data=ref,
                             metrics=fit_metrics, overwrite=tc.overwrite)
    return {"job": JOB, "run_id": record.run_id, "model": out, "name": manifest.name, "version": manifest.version,
            "train_rows": int(train.pixels.shape[0]), "val_rows": int(val.pixels.shape[0]),
            "val": val_metrics, **_fit_summary(result), "seconds": round(result.seconds, 1)}


def _interpolate(clf: Classifier, base: dict, val: LabelledSet, result: FitResult, tc: TrainCfg,
                 device: torch.device) -> FitResult:
    """WiSE-FT the fine-tuned towers towards the base; thresholds are then chosen on the interpolated model."""
    wise_ft(clf.model, base, tc.wise_alpha)
    probs = predict(clf, val.pixels, device, tc.precision)
    gap = metrics.gap_at_k(val.targets.numpy(), probs)
    log.info("WiSE-FT alpha %.2f: validation GAP %.4f (fine-tuned %.4f)", tc.wise_alpha, gap, result.best_val_gap)
    return dataclasses.replace(result, val_probs=probs, best_val_gap=gap)


def _labelled(frame: pd.DataFrame, classes: Sequence[ClassPromptCfg], spec: PreprocessSpec, cfg: JobCfg,
              record: RunRecord) -> tuple[LabelledSet, pd.DataFrame]:
    """One split's images in memory with its targets (and annotation mask), and the rows that loaded."""
    tc = cfg.train
    loaded = load_pixels(list(frame["uri"]), spec, cfg.fetch, cfg.decode, cfg.fetch.threads)
    for status, count in [(st.OK, int(loaded.rows.size)), *loaded.failures.items()]:
        record.status_counts[status] = record.status_counts.get(status, 0) + count
    rows = frame.iloc[loaded.rows]
    names = [c.name for c in classes]
    targets = multi_hot(list(rows[tc.label_column]), names)
    mask = None
    if tc.mask_unannotated:
        negatives = multi_hot(list(rows[tc.negatives_column]), names)
        mask = torch.from_numpy(np.maximum(targets, negatives))
    return LabelledSet(torch.from_numpy(loaded.pixels), torch.from_numpy(targets), mask), rows


def _check_data(train: LabelledSet, val: LabelledSet, tc: TrainCfg, table: str) -> None:
    """Refuse data that cannot train: no images, or no label among the configured classes."""
    if train.pixels.shape[0] == 0 or val.pixels.shape[0] == 0:
        raise ValueError(f"{table}: splits {tc.train_split!r} and {tc.val_split!r} both need loadable images "
                         f"(got {train.pixels.shape[0]} and {val.pixels.shape[0]})")
    if float(train.targets.sum()) == 0:
        raise ValueError(f"{table}: no {tc.label_column} entry of split {tc.train_split!r} is a configured class; "
                         "list the table's classes and prompts in train.classes")
    unseen = int((train.targets.sum(0) == 0).sum())
    if unseen:
        log.warning("%d configured classes have no positive in the training split", unseen)


def fingerprint(tc: TrainCfg, base_ref: dict, labels: LabelsTable) -> str:
    """Identity of a training run: the settings that shape the weights, the base model and the exact rows."""
    settings = {k: v for k, v in to_dict(tc).items() if k not in _NOT_IN_FINGERPRINT}
    rows = labels.frame.drop(columns=["uri"]).astype(str).to_csv(index=False)
    payload = json.dumps({"settings": settings, "base": base_ref, "table": labels.ref()}, sort_keys=True)
    return hashlib.sha256((payload + rows).encode()).hexdigest()


def _thresholds_and_metrics(clf: Classifier, classes: Sequence[ClassPromptCfg], val: LabelledSet, result: FitResult,
                            cfg: JobCfg, device: torch.device) -> tuple[list[ClassEntry], dict]:
    """Per-class thresholds with their validation promises (core/thresholds.py), and the validation summary.

    With train.calibration=platt the thresholds and the summary are on the calibrated probabilities, and the
    summary adds their ECE with the uncalibrated GAP and ECE beside them.
    """
    y, raw = val.targets.numpy(), result.val_probs
    probs, platts = validation_scores(clf, val.pixels, y, cfg.train, device, raw)
    entries = class_entries(classes, y, probs, cfg.train, platts=platts)
    names = [c.name for c in classes]
    idx = map_class_indices(y, names, cfg.evaluate.map_classes, cfg.evaluate.majority)
    summary = metrics.summary(y, probs, cfg.evaluate.gap_k, idx)
    if platts is not None:
        summary["ece"] = metrics.expected_calibration_error(y, probs)
        summary["gap_uncalibrated"] = metrics.gap_at_k(y, raw)
        summary["ece_uncalibrated"] = metrics.expected_calibration_error(y, raw)
        summary["calibrated_classes"] = float(sum(p.fitted for p in platts))
        log.info("Platt scaling on validation: ECE %.4f -> %.4f, GAP %.4f -> %.4f, %d of %d classes scaled",
                 summary["ece_uncalibrated"], summary["ece"], summary["gap_uncalibrated"], summary["gap"],
                 summary["calibrated_classes"], len(platts))
    summary["assigned_classes"] = float(sum(e.assign for e in entries))
    return entries, {k: _finite(v) for k, v in summary.items()}


def validation_scores(clf: Classifier, pixels: torch.Tensor, y: np.ndarray, tc: TrainCfg, device: torch.device,
                      raw: np.ndarray | None = None) -> tuple[np.ndarray, list[Platt] | None]:
    """Validation probabilities to choose thresholds on, and each class's Platt scaling (None: train.calibration=none).

    `raw` are the uncalibrated probabilities when already known. Platt scaling is fitted on the logits
    themselves: probabilities stored as float32 saturate at 1 long before the logits stop growing.
    """
    if tc.calibration == "none":
        return (predict(clf, pixels, device, tc.precision) if raw is None else raw), None
    logits = predict_logits(clf, pixels, device, tc.precision).cpu().numpy()
    platts = fit_platt(y, logits, min_support=tc.calibration_min_support)
    probs = apply_platt(logits, np.array([p.a for p in platts]), np.array([p.b for p in platts]))
    return probs, platts


def class_entries(classes: Sequence[ClassPromptCfg], y: np.ndarray, probs: np.ndarray, tc: TrainCfg,
                  zero_shot: bool = False, platts: Sequence[Platt] | None = None) -> list[ClassEntry]:
    """Manifest entries: each class's threshold, fallback decision, validation AUC and expected precision/recall.

    `probs` are the probabilities tagging will store: with `platts`, the calibrated ones, which the entries'
    platt_a/platt_b reproduce.
    """
    choices = choose_thresholds(y, probs, tc.target_precision, min_support=tc.threshold_min_support,
                                shrinkage=tc.threshold_shrinkage, n_boot=tc.threshold_bootstrap, ci=tc.threshold_ci,
                                seed=tc.seed)
    entries = []
    for j, (c, t) in enumerate(zip(classes, choices)):
        platt = {} if platts is None else {"platt_a": platts[j].a, "platt_b": platts[j].b,
                                           "calibration": platts[j].note}
        entries.append(ClassEntry(
            c.name, c.prompt, float(np.clip(t.threshold, 0.0, 1.0)), zero_shot=zero_shot, assign=t.assign,
            note=t.note, target_precision=tc.target_precision, support=t.support,
            auc=_finite(metrics.roc_auc(y[:, j], probs[:, j])), expected_precision=_finite(t.precision),
            precision_low=_finite(t.precision_low), precision_high=_finite(t.precision_high),
            expected_recall=_finite(t.recall), recall_low=_finite(t.recall_low), recall_high=_finite(t.recall_high),
            **platt))
        log.info("class %s: %s%s", c.name, f"threshold {t.threshold:.3f} ({t.note})" if t.assign else t.note,
                 "" if platts is None else f"; {platts[j].note}")
    return entries


def _zero_shot_entries(model: MuMIC, val: LabelledSet, val_rows: pd.DataFrame, cfg: JobCfg,
                       device: torch.device) -> list[ClassEntry]:
    """model.zero_shot classes scored from their prompts on the validation split, where it labels them.

    How far the fine-tuned model still ranks a zero-shot class's images (its validation AUC) and the
    threshold that class would need: what the tagging run can log and use for that class.
    """
    tc = cfg.train
    names = [z.name for z in cfg.model.zero_shot]
    if not names:
        return []
    y = multi_hot(list(val_rows[tc.label_column]), names)
    labelled = [j for j in range(len(names)) if y[:, j].any()]
    if not labelled:
        return []
    zs = [cfg.model.zero_shot[j] for j in labelled]
    y = y[:, labelled]
    probs, platts = validation_scores(Classifier(model, [z.prompt for z in zs]), val.pixels, y, tc, device)
    prompts = [ClassPromptCfg(z.name, z.prompt) for z in zs]
    return class_entries(prompts, y, probs, tc, zero_shot=True, platts=platts)


def _base_zero_shot_entries(base_ref: dict, val: LabelledSet, val_rows: pd.DataFrame, cfg: JobCfg,
                            device: torch.device) -> list[ClassEntry]:
    """The same entries for the base artifact training started from: what model.zero_shot_from=base would get.

    Reloaded from the artifact rather than kept from before training: tagging will load exactly that.
    """
    if not cfg.model.zero_shot or "artifact" not in base_ref:
        return []
    base, _ = load_artifact(base_ref["artifact"], device=device)
    return _zero_shot_entries(base, val, val_rows, cfg, device)


def _log_retention(tuned: Sequence[ClassEntry], base: Sequence[ClassEntry]) -> None:
    """Validation AUC of each zero-shot class before and after fine-tuning: what model.zero_shot_from decides on."""
    before = {e.name: e.auc for e in base}
    for e in tuned:
        if e.name in before:
            log.info("zero-shot class %s: validation AUC %s with the base model, %s fine-tuned", e.name,
                     before[e.name], e.auc)


def _history(result: FitResult) -> list[dict]:
    """Per-epoch training curves for the manifest (JSON has no NaN: null instead)."""
    return [{k: _finite(v) if isinstance(v, float) else v for k, v in h.items()} for h in result.history]


def _fit_summary(result: FitResult) -> dict:
    return {"best_epoch": result.best_epoch + 1, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from}


def _finite(value: float) -> float | None:
    """JSON has no NaN: undefined metrics are stored as null."""
    return None if value is None or not np.isfinite(value) else round(float(value), 6)
