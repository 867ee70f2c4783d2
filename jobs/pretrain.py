"""Pretrain a small open_clip model contrastively on the labels table's captions: the stand-in for CLIP.

Machines that cannot download CLIP weights use this to get a base model whose zero-shot prompts and
transfer learning mean something. Reads the pretrain.split captions (and pretrain.val_split to pick
the step kept) of tables.labels, images through the tagging job's fetch/decode code, and writes a base
artifact to pretrain.out. In production, skip it: fine-tune from real open_clip weights
(train.clip_weights). Last stdout line: a JSON summary.
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__).parse_args(argv)
    return cli.run_job("pretrain", args, [], cli.pipeline_body("pretrain"))


if __name__ == "__main__":
    sys.exit(main())
