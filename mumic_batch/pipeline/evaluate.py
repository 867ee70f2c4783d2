"""Evaluation job: score a labels split with the tagging job's inference runner, write metrics and a report.

Headline numbers are over the model's own classes (its manifest): GAP, GAP@k and macro mAP over a class
subset (evaluate.map_classes, or the evaluate.majority classes with the most positives in the split).
Zero-shot classes from model.zero_shot are scored through the text tower in the same pass, reported per
class (AP against prevalence, ROC AUC) and summarised separately, never mixed into the headline numbers.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from mumic_batch.config import JobCfg, to_dict
from mumic_batch.core import metrics
from mumic_batch.core import status as st
from mumic_batch.core.report import ClassResult, plot_training_curves, write_report
from mumic_batch.io.fetch import Fetcher
from mumic_batch.model.manifest import ClassEntry
from mumic_batch.inference.runner import Runner
from mumic_batch.model.predictor import Predictor
from mumic_batch.pipeline.labels import map_class_indices, multi_hot, read_labels
from mumic_batch.pipeline.runs import RunRecord, recorded
from mumic_batch.tables.io import append_rows
from mumic_batch.tables.schemas import METRICS

log = logging.getLogger(__name__)

JOB = "evaluate"

TRAINING_CURVES_FILE = "training_curves.png"
_FRAME_ROWS = 256  # rows handed to the runner at a time, as a Spark Arrow frame would be


def run(spark: SparkSession, cfg: JobCfg) -> dict:
    """Evaluate model.artifact on evaluate.split; append to tables.metrics, write the report, record a runs row."""
    record = RunRecord(JOB, to_dict(cfg), source=cfg.tables.labels)
    return recorded(spark, record, cfg.tables.runs, lambda: _evaluate(spark, cfg, record))


def _evaluate(spark: SparkSession, cfg: JobCfg, record: RunRecord) -> dict:
    ev = cfg.evaluate
    labels = read_labels(spark, cfg.tables, [ev.split], [ev.label_column])
    frame = labels.split(ev.split)
    if frame.empty:
        raise ValueError(f"split {ev.split!r} of {cfg.tables.labels} has no rows")
    record.source_version, record.input_rows = labels.version, len(frame)
    predictor = Predictor.load(cfg.model.artifact, zero_shot=cfg.model.zero_shot, device=cfg.infer.device,
                               precision=cfg.infer.precision, zero_shot_from=cfg.model.zero_shot_from)
    record.model_name, record.model_version = predictor.model_name, predictor.model_version
    started = time.perf_counter()
    scores, embeddings, ok = score(predictor, frame, cfg)
    record.stage_seconds["score"] = time.perf_counter() - started
    record.processed = len(frame)
    record.status_counts = dict(Counter(ok["status"]))
    record.images_per_s = len(frame) / record.stage_seconds["score"] if record.stage_seconds["score"] else None
    good = (ok["status"] == st.OK).to_numpy()
    if not good.any():
        raise ValueError(f"no image of split {ev.split!r} could be scored: {record.status_counts}")
    y = multi_hot(list(frame.loc[good, ev.label_column]), predictor.class_names)
    classes = predictor.classes
    overall, per_class = evaluate_scores(y, scores[good], classes, len(predictor.manifest.classes),
                                         ev.gap_k, ev.map_classes, ev.majority)
    n_own = len(predictor.manifest.classes)
    overall.update(uncalibrated(predictor, y[:, :n_own], embeddings[good], ev.gap_k))
    overall.update(metrics.retrieval(y[:, :n_own], embeddings[good]))
    extra = _confusion_section(y[:, :n_own], scores[good][:, :n_own], classes[:n_own])
    if ev.previous:
        deltas, section = compare_previous(cfg, predictor, frame, scores, good)
        overall.update(deltas)
        extra += section
    overall["images"], overall["failed_images"] = float(good.sum()), float((~good).sum())
    dataset = ev.dataset or cfg.tables.labels
    evaluated_at = dt.datetime.now(dt.timezone.utc)
    rows = metric_rows(predictor, dataset, ev.split, overall, per_class, record.run_id, evaluated_at)
    append_rows(spark, rows, METRICS, cfg.tables.metrics)
    report = _report(cfg, predictor, dataset, labels.version, overall, per_class, evaluated_at,
                     metrics.reliability(y[:, :n_own], scores[good][:, :n_own]), extra)
    log.info("evaluated %s %s on %s/%s: %s", predictor.model_name, predictor.model_version, dataset, ev.split,
             {k: round(v, 4) for k, v in overall.items() if v is not None and not math.isnan(v)})
    return _summary(record, cfg, predictor, overall, per_class, report)


def score(predictor: Predictor, frame: pd.DataFrame, cfg: JobCfg) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Probabilities [N, C] in predictor.classes order and embeddings [N, D] (zeros for failed rows), statuses."""
    runner = Runner(predictor, Fetcher(cfg.fetch), cfg.decode, cfg.infer, cfg.fetch.threads)
    chunks = (frame[["image_id", "uri"]].iloc[i:i + _FRAME_ROWS] for i in range(0, len(frame), _FRAME_ROWS))
    try:
        out = pd.concat(list(runner.run_pandas(chunks)), ignore_index=True)
    finally:
        runner.close()
    scores = np.zeros((len(out), len(predictor.classes)), dtype=np.float64)
    embeddings = np.zeros((len(out), predictor.manifest.embed_dim), dtype=np.float64)
    for i, row in enumerate(out.itertuples(index=False)):
        if row.status == st.OK:
            probs = {**row.probs, **row.zero_shot_probs}
            scores[i] = [probs[name] for name in predictor.class_names]
            embeddings[i] = row.embedding
    return scores, embeddings, out[["image_id", "status", "error"]]


def evaluate_scores(y: np.ndarray, scores: np.ndarray, classes: Sequence[ClassEntry], n_own: int, k: int,
                    map_classes: Sequence[str], majority: int) -> tuple[dict[str, float], list[ClassResult]]:
    """Overall metrics over the model's own classes (the first `n_own`), zero-shot extras summarised apart."""
    names = [c.name for c in classes]
    thresholds = np.array([c.effective_threshold for c in classes])
    precision, recall = metrics.precision_recall_at(y, scores, thresholds)
    assigned = (scores >= thresholds[None, :]).mean(axis=0) if len(y) else np.full(len(classes), math.nan)
    per_class = [_class_result(c, y[:, j], scores[:, j], precision[j], recall[j], assigned[j])
                 for j, c in enumerate(classes)]
    # The manifest's classes are the model's own (for a base model they are zero-shot prompts as well);
    # the config's extras are reported apart so that the headline numbers stay comparable across models.
    y_own, s_own = y[:, :n_own], scores[:, :n_own]
    subset = map_class_indices(y_own, names[:n_own], map_classes, majority)
    overall = metrics.summary(y_own, s_own, k, subset)
    overall["map_all"] = metrics.macro_map(y_own, s_own)
    overall["map_classes"] = float(len(subset))
    overall["ece"] = metrics.expected_calibration_error(y_own, s_own)
    own = per_class[:n_own]
    overall["assigned_classes"] = float(sum(r.assign for r in own))
    for flag in ("worse than chance", "threshold misses target", "over-assigned"):
        overall[flag.replace(" ", "_").replace("-", "_")] = float(sum(flag in r.flags for r in own))
    extras = per_class[n_own:]
    if extras:
        overall["zero_shot_map"] = _nanmean([r.ap for r in extras])
        overall["zero_shot_prevalence"] = _nanmean([r.prevalence for r in extras])
        overall["zero_shot_auc"] = _nanmean([r.auc for r in extras])
    return overall, per_class


def uncalibrated(predictor: Predictor, y_own: np.ndarray, embeddings: np.ndarray, k: int) -> dict[str, float]:
    """GAP, GAP@k and ECE of the model's own classes without their Platt scaling; nothing when none is scaled.

    The probabilities come from the stored-embedding path (the ClassHead add_labels uses) with the scaling
    left out, so they are the uncalibrated model's on the same images.
    """
    own = predictor.manifest.classes
    if not any(c.calibrated for c in own):
        return {}
    raw = predictor.class_head([c.name for c in own]).probs(embeddings.astype(np.float32), calibrated=False)
    return {"gap_uncalibrated": metrics.gap_at_k(y_own, raw),
            f"gap_at_{k}_uncalibrated": metrics.gap_at_k(y_own, raw, k),
            "ece_uncalibrated": metrics.expected_calibration_error(y_own, raw)}


def _confusion_section(y: np.ndarray, scores: np.ndarray, classes: Sequence[ClassEntry], top: int = 10) -> list[str]:
    """Report lines: the class pairs where one class is most often assigned to the other's images."""
    thresholds = np.array([c.effective_threshold for c in classes])
    pairs = metrics.confused_pairs(y, scores >= thresholds[None, :], top)
    lines = ["## Most confused class pairs", "",
             "Images labelled with the first class, not the second, yet assigned the second.", ""]
    if not pairs:
        return lines + ["No class is assigned to another class's images.", ""]
    lines += ["| labelled | wrongly assigned | images |", "|---|---|---|"]
    lines += [f"| {classes[i].name} | {classes[j].name} | {n} |" for i, j, n in pairs]
    return lines + [""]


def compare_previous(cfg: JobCfg, predictor: Predictor, frame: pd.DataFrame, scores: np.ndarray,
                     good: np.ndarray) -> tuple[dict[str, float], list[str]]:
    """The model against evaluate.previous on the same images: deltas with paired bootstrap intervals.

    Over the classes both models have (their own, not zero-shot extras); overall GAP@k, GAP and mAP (the
    evaluate.majority best-supported shared classes), and per-class AP. Positive deltas: this model is better.
    """
    ev = cfg.evaluate
    previous = Predictor.load(ev.previous, device=cfg.infer.device, precision=cfg.infer.precision)
    prev_scores, _, prev_ok = score(previous, frame, cfg)
    both = good & (prev_ok["status"] == st.OK).to_numpy()
    own = predictor.class_names[:len(predictor.manifest.classes)]
    shared = [n for n in own if n in previous.class_names]
    a = prev_scores[both][:, [previous.class_names.index(n) for n in shared]]
    b = scores[both][:, [predictor.class_names.index(n) for n in shared]]
    y = multi_hot(list(frame.loc[both, ev.label_column]), shared)
    subset = map_class_indices(y, shared, ev.map_classes, ev.majority)
    overall_metrics = {f"gap_at_{ev.gap_k}": lambda t, s: metrics.gap_at_k(t, s, ev.gap_k), "gap": metrics.gap_at_k,
                       "map": lambda t, s: metrics.macro_map(t, s, subset)}
    out: dict[str, float] = {}
    lines = [f"## Compared with {previous.model_name} {previous.model_version}", "",
             f"{int(both.sum())} images both models scored, {len(shared)} shared classes; delta = this model - "
             f"previous, with a 90% paired bootstrap interval (images resampled jointly).", "",
             "| metric | previous | this | delta | 90% interval |", "|---|---|---|---|---|"]
    for name, fn in overall_metrics.items():
        delta, low, high = metrics.paired_bootstrap(y, a, b, fn)
        out.update({f"vs_previous_{name}": delta, f"vs_previous_{name}_low": low, f"vs_previous_{name}_high": high})
        lines.append(f"| {name} | {fn(y, a):.4f} | {fn(y, b):.4f} | {delta:+.4f} | {low:+.4f} .. {high:+.4f} |")
    per_class = []
    for j, name in enumerate(shared):
        if y[:, j].any():
            ap = lambda t, s, j=j: metrics.average_precision(t[:, j], s[:, j])  # noqa: E731
            per_class.append((name, *metrics.paired_bootstrap(y, a, b, ap, n_boot=100)))
    per_class.sort(key=lambda row: row[1])
    lines += ["", "Per-class AP, largest losses first:", "", "| class | AP delta | 90% interval |", "|---|---|---|"]
    lines += [f"| {n} | {d:+.3f} | {lo:+.3f} .. {hi:+.3f} |" for n, d, lo, hi in per_class]
    return out, lines + [""]


def _class_result(entry: ClassEntry, y: np.ndarray, s: np.ndarray, precision: float, recall: float,
                  assigned_rate: float) -> ClassResult:
    curve_p, curve_r, _ = metrics.precision_recall_curve(y, s)
    return ClassResult(
        name=entry.name, zero_shot=entry.zero_shot, support=int(y.sum()),
        prevalence=float(y.mean()) if y.size else math.nan, ap=metrics.average_precision(y, s),
        auc=metrics.roc_auc(y, s), threshold=float(entry.threshold), precision=float(precision),
        recall=float(recall), curve_precision=tuple(curve_p.tolist()), curve_recall=tuple(curve_r.tolist()),
        assign=entry.assign, assigned_rate=float(assigned_rate),
        target_precision=math.nan if entry.target_precision is None else entry.target_precision,
    )


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _value(v: float | None) -> float | None:
    """NaN (an undefined metric) is stored as null."""
    return None if v is None or math.isnan(v) else float(v)


def metric_rows(predictor: Predictor, dataset: str, split: str, overall: dict[str, float],
                per_class: Sequence[ClassResult], run_id: str, evaluated_at: dt.datetime) -> list[tuple]:
    """Rows of the metrics table: overall metrics (class null), then per-class metrics."""
    head = (predictor.model_name, predictor.model_version, dataset, split)
    rows = [(*head, None, None, metric, _value(value), run_id, evaluated_at) for metric, value in overall.items()]
    for r in per_class:
        per = {"ap": r.ap, "auc": r.auc, "support": float(r.support), "prevalence": r.prevalence,
               "threshold": r.threshold, "precision": r.precision, "recall": r.recall,
               "assigned_rate": r.assigned_rate, "assign": float(r.assign), "target_precision": r.target_precision}
        rows += [(*head, r.name, r.zero_shot, metric, _value(value), run_id, evaluated_at)
                 for metric, value in per.items()]
    return rows


def _report(cfg: JobCfg, predictor: Predictor, dataset: str, version: int | None, overall: dict[str, float],
            per_class: Sequence[ClassResult], evaluated_at: dt.datetime,
            calibration: tuple[np.ndarray, np.ndarray, np.ndarray], extra: list[str]) -> Path:
    ev = cfg.evaluate
    out = Path(ev.report_dir) / f"{predictor.model_version}-{ev.split}"
    meta = {"model": f"{predictor.model_name} {predictor.model_version} ({cfg.model.artifact})",
            "weights sha256": predictor.weights_sha256,
            "data": f"{dataset}" + ("" if version is None else f" (Delta version {version})") + f", split {ev.split}",
            "evaluated at": evaluated_at.isoformat(timespec="seconds")}
    notes = [f"GAP, GAP@{ev.gap_k} and map are over the model's own {len(predictor.manifest.classes)} classes; "
             "map averages the classes listed in evaluate.map_classes or the evaluate.majority classes with the "
             "most positives (map_all: every class with a positive). zero_shot_* summarise the model.zero_shot "
             "classes, scored from their prompts only; compare each one's AP with its prevalence (chance)."]
    if "ece_uncalibrated" in overall:
        notes.append("Probabilities, thresholds and ece are after the model's per-class Platt scaling "
                     "(train.calibration, platt_a/platt_b in the manifest); the *_uncalibrated numbers are the "
                     "same images and classes without it.")
    history = predictor.manifest.metrics.get("history")
    if history:
        out.mkdir(parents=True, exist_ok=True)
        plot_training_curves(history, out / TRAINING_CURVES_FILE)
        extra = extra + ["## Training curves", "", f"![Training curves]({TRAINING_CURVES_FILE})", ""]
    return write_report(out, f"Evaluation of {predictor.model_name} {predictor.model_version}", meta, overall,
                        per_class, notes, calibration, extra)


def _summary(record: RunRecord, cfg: JobCfg, predictor: Predictor, overall: dict[str, float],
             per_class: Sequence[ClassResult], report: Path) -> dict:
    extras = per_class[len(predictor.manifest.classes):]
    promised = {c.name: [_value(c.precision_low), _value(c.precision_high)] for c in predictor.classes}
    return {
        "job": JOB, "run_id": record.run_id, "model": cfg.model.artifact, "name": predictor.model_name,
        "version": predictor.model_version, "split": cfg.evaluate.split,
        "overall": {k: _value(v) for k, v in overall.items()},
        "zero_shot": {r.name: {"ap": _value(r.ap), "auc": _value(r.auc), "prevalence": _value(r.prevalence)}
                      for r in extras},
        "classes": {r.name: {"ap": _value(r.ap), "auc": _value(r.auc), "prevalence": _value(r.prevalence),
                             "precision": _value(r.precision), "recall": _value(r.recall), "assign": r.assign,
                             "target_precision": _value(r.target_precision), "threshold": r.threshold,
                             "assigned_rate": _value(r.assigned_rate), "zero_shot": r.zero_shot,
                             "promised_precision": promised[r.name], "flags": list(r.flags)} for r in per_class},
        "metrics": cfg.tables.metrics, "report": str(report),
    }
