"""Run SQL over the project's tables and print the results.

Views available: catalogue, labels, predictions, runs, metrics and label_probs (one row per image,
model version and label; see docs/tables.md). Give statements with --sql (repeatable) or a file
with --file (statements end with ';'). Results print as text tables; the last stdout line is a JSON
summary holding every result's rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mumic_batch import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--sql", action="append", default=[], help="a SQL statement (repeatable)")
    p.add_argument("--file", help="a .sql file of statements separated by ';' (e.g. docs/queries.sql)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a named SQL parameter, used as :NAME in the statements (repeatable)")
    args = p.parse_args(argv)

    def body(cfg):
        from mumic_batch.pipeline import query
        from mumic_batch.spark.session import owned_session

        statements = list(args.sql)
        if args.file:
            statements += list(query.named_statements(Path(args.file).read_text()).values())
        if not statements:
            raise ValueError("no SQL given: pass --sql 'SELECT ...' or --file queries.sql")
        with owned_session(cfg.spark, query.JOB) as spark:
            views = query.register_views(spark, cfg.tables)
            results = query.run_sql(spark, statements, query.parse_params(args.param))
        for sql, rows in zip(statements, results):
            print(f"\n> {' '.join(sql.split())}\n{query.format_rows(rows)}")
        return {"job": query.JOB, "views": views, "results": results}

    return cli.run_job("query", args, [], body)


if __name__ == "__main__":
    sys.exit(main())
