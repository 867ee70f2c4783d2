"""Maintain the predictions table: OPTIMIZE with ZORDER BY (image_id), optionally purge deletion
vectors, then VACUUM; the same for its retry table.

Run it after a backfill and on a schedule (e.g. weekly): Z-ordering keeps each file to a narrow
range of image_id, so the MERGE of retried and changed rows touches few files, and VACUUM removes
the files that MERGE, OPTIMIZE and failed runs left unreferenced, once older than
maintain.retain_hours (default 7 days, so running readers and time travel keep working).
Tagging runs may go on meanwhile: OPTIMIZE only rewrites files and commits with Delta's conflict
checks. Last stdout line: a JSON summary with the operations' metrics.
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__).parse_args(argv)
    return cli.run_job("maintain", args, [], cli.pipeline_body("maintain"))


if __name__ == "__main__":
    sys.exit(main())
