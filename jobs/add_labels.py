"""Add zero-shot classes to rows already tagged, from their stored embeddings: no image is fetched.

For the model version of model.artifact, every `ok` row of the predictions table gets the classes
of model.zero_shot (name, prompt, threshold; add_labels.classes picks some of them by name) scored
from its stored embedding through the model's text tower, temperature and bias, exactly as tagging
with those classes would have scored them, merged into zero_shot_probs / zero_shot_labels (MERGE on
image_id and model_version; the row's other zero-shot classes are kept). Keep the classes in
model.zero_shot for the nightly tagging runs too, so that rows tagged later get them in the same
pass. One runs row. Last stdout line: a JSON summary (classes, input_rows, processed, rows_per_s).

  python -m jobs.add_labels --config conf/local.yaml \\
    --set 'model.zero_shot=[{name: pool, prompt: a photo with a pool, threshold: 0.6}]'
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__).parse_args(argv)
    return cli.run_job("add_labels", args, [], cli.pipeline_body("add_labels"))


if __name__ == "__main__":
    sys.exit(main())
