"""Tag catalogue images with a MuMIC model and MERGE the predictions into Delta.

Incremental by default: only rows with no prediction for the model version, a changed uri or
updated_at, or a failure with attempts left are processed. The rows are scored and committed in
chunks of about tag.chunk_rows (rows new to the model version appended, the others MERGEd), each
chunk committed while the next one scores: a backfill killed part way keeps its committed chunks,
and the same command resumes it. Run under spark-submit or plain python.
Last stdout line: a JSON summary (run_id, input_rows, processed, chunks, status_counts, images_per_s, ...).
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--full", action="store_true", help="reprocess every catalogue row (same as --set tag.full=true)")
    args = p.parse_args(argv)
    return cli.run_job("tag_images", args, ["tag.full=true"] if args.full else [], cli.pipeline_body("tag"))


if __name__ == "__main__":
    sys.exit(main())
