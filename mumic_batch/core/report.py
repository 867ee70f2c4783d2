"""Evaluation report: a Markdown file with per-class precision-recall curves and an AP chart (PNG, Agg backend).

Pure rendering: the numbers come in computed (core.metrics); nothing here scores or reads tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on batch machines
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

PR_CURVES_FILE = "pr_curves.png"
AP_CHART_FILE = "ap_per_class.png"
RELIABILITY_FILE = "reliability.png"
PAGE_CLASSES = 12  # with more classes than 2x this, charts show the worst and best this many (by AP), the table all
REPORT_FILE = "report.md"
_TRAINED_COLOUR, _ZERO_SHOT_COLOUR = "#1f77b4", "#d62728"
_GRID_COLUMNS = 6
PRECISION_TOLERANCE = 0.1  # a threshold "misses" when precision falls more than this below its target
OVER_ASSIGNED = 2.0  # a class assigned to more than this times its prevalence is over-assigned
FLAGS = ("worse than chance: ROC AUC < 0.5", f"threshold misses target: precision < target - {PRECISION_TOLERANCE}",
         f"over-assigned: assigned to more than {OVER_ASSIGNED:g}x its prevalence",
         "no label: the threshold fell back to never assigning the class (too few or too unreliable positives)")


@dataclass(frozen=True)
class ClassResult:
    """One class's evaluation: ranking quality, and the decision at its threshold."""

    name: str
    zero_shot: bool  # scored from its prompt only, never trained on
    support: int  # positives in the evaluated split
    prevalence: float  # support / images: the AP of a random ranking
    ap: float  # average precision (NaN without positives)
    auc: float  # ROC AUC (NaN unless positives and negatives occur)
    threshold: float  # the model's decision threshold for the class
    precision: float  # precision of score >= threshold (NaN when nothing is predicted)
    recall: float  # recall of score >= threshold (NaN without positives)
    curve_precision: tuple[float, ...] = ()  # precision at each distinct score, highest score first
    curve_recall: tuple[float, ...] = ()  # recall at the same points
    assign: bool = True  # False: the model never assigns this class (its threshold fell back to no label)
    target_precision: float = math.nan  # the precision the threshold was chosen for (NaN: none recorded)
    assigned_rate: float = math.nan  # share of the evaluated images the class is assigned to

    @property
    def flags(self) -> tuple[str, ...]:
        """What an ML engineer should look at: see FLAGS."""
        out = []
        if self.auc < 0.5:
            out.append("worse than chance")
        if self.assign and self.precision < self.target_precision - PRECISION_TOLERANCE:
            out.append("threshold misses target")
        if self.assigned_rate > OVER_ASSIGNED * self.prevalence:
            out.append("over-assigned")
        if not self.assign:
            out.append("no label")
        return tuple(out)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def plot_pr_curves(classes: Sequence[ClassResult], path: Path) -> None:
    """A grid with one precision-recall curve per class; zero-shot classes in red."""
    rows = max(1, math.ceil(len(classes) / _GRID_COLUMNS))
    fig, axes = plt.subplots(rows, _GRID_COLUMNS, figsize=(2.6 * _GRID_COLUMNS, 2.4 * rows), squeeze=False)
    for ax, result in zip(axes.flat, classes):
        colour = _ZERO_SHOT_COLOUR if result.zero_shot else _TRAINED_COLOUR
        if result.curve_recall:
            # A step plot: precision holds from one recall point to the next, as AP sums it.
            ax.step(np.r_[0.0, result.curve_recall], np.r_[result.curve_precision[0], result.curve_precision],
                    where="pre", color=colour)
        ax.axhline(result.prevalence, color="grey", linestyle=":", linewidth=1)
        if result.assign and not math.isnan(result.recall) and not math.isnan(result.precision):
            ax.plot([result.recall], [result.precision], "o", color="black", markersize=4)  # the threshold
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        tag = " (zero-shot)" if result.zero_shot else ""
        ax.set_title(f"{result.name}{tag}\nAP {_fmt(result.ap, 2)}, n={result.support}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_ap_chart(classes: Sequence[ClassResult], path: Path) -> None:
    """Horizontal bars of per-class AP (highest first), with each class's prevalence (chance level) marked."""
    ordered = sorted(classes, key=lambda c: -1.0 if math.isnan(c.ap) else c.ap)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(ordered) + 1.2))
    ys = np.arange(len(ordered))
    colours = [_ZERO_SHOT_COLOUR if c.zero_shot else _TRAINED_COLOUR for c in ordered]
    ax.barh(ys, [0.0 if math.isnan(c.ap) else c.ap for c in ordered], color=colours)
    ax.scatter([c.prevalence for c in ordered], ys, marker="|", color="black", s=80, label="prevalence (chance AP)")
    ax.set_yticks(ys, [c.name + (" *" if c.zero_shot else "") for c in ordered], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision (* zero-shot, in red)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_reliability(confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray, path: Path) -> None:
    """Reliability diagram over every (image, class) pair: positive rate against mean probability per bin."""
    fig, ax = plt.subplots(figsize=(4, 4))
    filled = counts > 0
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.plot(confidence[filled], accuracy[filled], "o-", color=_TRAINED_COLOUR)
    for x, yv, n in zip(confidence[filled], accuracy[filled], counts[filled]):
        ax.annotate(str(int(n)), (x, yv), fontsize=6, textcoords="offset points", xytext=(3, -8))
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="share of positive pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_training_curves(history: Sequence[Mapping[str, float | None]], path: Path) -> None:
    """Training and validation loss, and validation GAP, per epoch (a fine-tuned manifest's metrics.history)."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, (loss_ax, gap_ax) = plt.subplots(1, 2, figsize=(8, 3))
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        loss_ax.plot(epochs, [np.nan if h.get(key) is None else h[key] for h in history], label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss")
    loss_ax.legend(fontsize=7)
    gap_ax.plot(epochs, [np.nan if h.get("val_gap") is None else h["val_gap"] for h in history], color="black")
    gap_ax.set(xlabel="epoch", ylabel="validation GAP")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def pages(classes: Sequence[ClassResult]) -> list[ClassResult]:
    """The classes the charts show: all of them, or with many classes the PAGE_CLASSES worst and best by AP."""
    if len(classes) <= 2 * PAGE_CLASSES:
        return list(classes)
    ranked = sorted(classes, key=lambda c: -1.0 if math.isnan(c.ap) else c.ap)
    return ranked[:PAGE_CLASSES] + ranked[-PAGE_CLASSES:]


def _class_table(classes: Sequence[ClassResult]) -> list[str]:
    lines = ["| class | zero-shot | support | prevalence | AP | AUC | threshold | target | precision | recall | "
             "assigned | flags |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in classes:
        threshold = _fmt(c.threshold) if c.assign else "none"
        lines.append(f"| {c.name} | {'yes' if c.zero_shot else ''} | {c.support} | {_fmt(c.prevalence)} | "
                     f"{_fmt(c.ap)} | {_fmt(c.auc)} | {threshold} | {_fmt(c.target_precision, 2)} | "
                     f"{_fmt(c.precision)} | {_fmt(c.recall)} | {_fmt(c.assigned_rate)} | {', '.join(c.flags)} |")
    return lines


def write_report(out_dir: str | Path, title: str, meta: Mapping[str, object], overall: Mapping[str, float | None],
                 classes: Sequence[ClassResult], notes: Sequence[str] = (),
                 calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 extra: Sequence[str] = ()) -> Path:
    """Write report.md and its charts (PR curves, AP per class, reliability) into `out_dir`; return its path.

    `extra`: Markdown lines appended at the end (sections whose charts the caller wrote into `out_dir`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = pages(classes)
    plot_pr_curves(shown, out / PR_CURVES_FILE)
    plot_ap_chart(shown, out / AP_CHART_FILE)
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "## Overall", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value, 4)} |" for key, value in overall.items()]
    flagged = [c for c in classes if any(f != "no label" for f in c.flags)]
    lines += ["", *notes, "", "## Flags", ""]
    lines += [f"- {flag}" for flag in FLAGS]
    lines += ["", *(_class_table(flagged) if flagged else ["No class is flagged."])]
    lines += ["", "## Per class", "", *_class_table(classes), ""]
    subset = "" if len(shown) == len(classes) else f" ({PAGE_CLASSES} worst and {PAGE_CLASSES} best by AP)"
    lines += [f"## Average precision per class{subset}", "", f"![AP per class]({AP_CHART_FILE})", "",
              f"## Precision-recall curves{subset}", "",
              "Dotted line: prevalence (the precision of a random ranking); dot: the class's threshold.", "",
              f"![Precision-recall curves]({PR_CURVES_FILE})", ""]
    if calibration is not None:
        plot_reliability(*calibration, out / RELIABILITY_FILE)
        lines += ["## Calibration", "", "Every (image, class) pair of the model's own classes, in 10 probability "
                  "bins (numbers: pairs per bin); ece is the pair-weighted mean gap to the diagonal.", "",
                  f"![Reliability]({RELIABILITY_FILE})", ""]
    lines += list(extra)
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
