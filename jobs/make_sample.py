"""Generate the seeded sample catalogue: JPEG images, a catalogue table and a labels table.

Writes <sample.out_dir>/images/*.jpg, <sample.out_dir>/catalogue and <sample.out_dir>/labels
(Delta by default, Parquet with --set sample.table_format=parquet). Same seed, same bytes.
"""

from __future__ import annotations

import sys

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__).parse_args(argv)

    def body(cfg):
        from mumic_batch.pipeline import sample
        from mumic_batch.spark.session import owned_session

        with owned_session(cfg.spark, sample.JOB) as spark:
            return sample.run(spark, cfg.sample)

    return cli.run_job("make_sample", args, [], body)


if __name__ == "__main__":
    sys.exit(main())
