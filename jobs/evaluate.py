"""Evaluate a MuMIC artifact on a labels split through the tagging job's inference engine.

Scores evaluate.split of tables.labels with model.artifact (plus the model.zero_shot classes, scored from
their prompts), computes GAP, GAP@k, macro mAP over a class subset (default: the majority classes), per-class
AP, ROC AUC and precision/recall at the model's thresholds, appends them to the metrics Delta table
(tables.metrics) and writes a Markdown report with precision-recall curves and a per-class AP chart to
<evaluate.report_dir>/<model_version>-<split>/. Last stdout line: a JSON summary.
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__).parse_args(argv)
    return cli.run_job("evaluate", args, [], cli.pipeline_body("evaluate"))


if __name__ == "__main__":
    sys.exit(main())
