"""Tag catalogue images with a MuMIC model and MERGE the predictions into Delta.

Incremental by default: only rows with no prediction for the model version, a changed uri or
updated_at, or a failure with attempts left are processed. Run under spark-submit or plain python.
Last stdout line: a JSON summary (run_id, input_rows, processed, status_counts, images_per_s, ...).
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--full", action="store_true", help="reprocess every catalogue row (same as --set tag.full=true)")
    args = p.parse_args(argv)

    def body(cfg):
        from mumic_batch.pipeline import tag
        from mumic_batch.spark.session import owned_session

        with owned_session(cfg.spark, tag.JOB) as spark:
            return tag.run(spark, cfg)

    return cli.run_job("tag_images", args, ["tag.full=true"] if args.full else [], body)


if __name__ == "__main__":
    sys.exit(main())
