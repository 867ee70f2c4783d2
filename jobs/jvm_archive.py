"""Write the class-data archive of the local driver JVM (AppCDS): Spark's and Delta's classes parsed
and verified once, mapped by every later local job with the same JDK, Spark jars, Delta packages and
driver options (spark.class_archive names its directory). A local job then spends seconds less
CPU before its first row is scored. `make setup` runs it; it does nothing when the archive exists.

It runs the jobs' kinds of Spark and Delta operations on scratch tables in a driver JVM of its own,
which writes the archive as it exits (about a minute on 2 cores, ~200 MB). Local runs only: under
spark-submit the cluster starts the driver. Last stdout line: a JSON summary (archive, written,
classes, bytes, seconds).
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--force", action="store_true", help="write the archive again even if it exists")
    args = p.parse_args(argv)

    def body(cfg):
        from mumic_batch.pipeline import jvm_archive

        return jvm_archive.run(cfg, force=args.force)

    return cli.run_job("jvm_archive", args, [], body)


if __name__ == "__main__":
    sys.exit(main())
