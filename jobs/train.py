"""Fine-tune a MuMIC model on a labels table (Delta, Parquet or catalog table) and write a versioned artifact.

Starts from train.base (a MuMIC artifact, e.g. the one jobs/pretrain.py writes) or from open_clip weights
(train.clip_weights: local path, s3:// or hf-hub:org/repo from the offline Hugging Face cache). Trains
with the hardness-aware tempered-sigmoid BCE over every image x class pair, validates every epoch, keeps
the epoch with the best validation GAP, fits per-class Platt scaling (train.calibration) and picks
per-class thresholds on validation, and writes the artifact to model.artifact. Checkpoints go to train.checkpoint_dir; rerunning the same run resumes there.
Last stdout line: a JSON summary.
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__).parse_args(argv)
    return cli.run_job("train", args, [], cli.pipeline_body("train"))


if __name__ == "__main__":
    sys.exit(main())
