"""Run SQL over the project's tables: named queries from a file, or statements given inline.

Views: catalogue, labels, predictions, runs, metrics and label_probs (one row per ok image, model
version and class; docs/tables.md). Tables are Delta or Parquet paths or catalog names (db.table).

  python -m jobs.query --config conf/local.yaml --file docs/queries.sql --name label_counts \\
      --param model_version=<version>
  python -m jobs.query --config conf/local.yaml --sql "SELECT count(*) FROM predictions" --out counts.csv

--name runs only the named queries of --file (only their :parameters are needed). Parameters are
strings: write CAST(:x AS DOUBLE) where a number is meant. --engine auto (the default) answers on
DuckDB, in-process and without a JVM, when every table is a local Delta or Parquet path and the query
has a text DuckDB runs (a query may carry an `-- engine: duckdb` variant); otherwise, or when DuckDB
rejects a statement as Spark SQL it does not know, on Spark. --engine duckdb|spark forces one.
Results print as text tables (at most --limit rows, default 20; cells cut at 60 characters); --out
FILE writes one query's result, every row up to --limit, uncut, as .csv, .parquet, .json or .jsonl.
The last stdout line is a JSON summary with the rows of every result (or the --out file and its row
count).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from mumic_batch import cli

SCREEN_ROWS = 20


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--sql", action="append", default=[], help="a SQL statement (repeatable)")
    p.add_argument("--file", help="a .sql file of statements separated by ';' (e.g. docs/queries.sql)")
    p.add_argument("--name", action="append", default=[], help="run only this named query of --file (repeatable)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a named SQL parameter, used as :NAME in the statements (repeatable)")
    p.add_argument("--engine", default="auto", choices=["auto", "duckdb", "spark"],
                   help="auto: DuckDB when it can read every table, else Spark (default auto)")
    p.add_argument("--limit", type=int, help="at most this many rows per query (printed, returned, written)")
    p.add_argument("--out", metavar="FILE",
                   help="write the (single) query's result to FILE: .csv, .parquet, .json, .jsonl")
    args = p.parse_args(argv)

    def body(cfg):
        from mumic_batch.sql.runner import Engines, run_queries
        from mumic_batch.sql.statements import format_rows, parse_params, rows, write_result

        queries = _queries(args)
        with ExitStack() as stack:
            factories = {"duckdb": lambda: _duckdb(cfg, stack), "spark": lambda: _spark(cfg, stack)}
            engines = Engines(args.engine, factories)
            results = run_queries(queries, parse_params(args.param), engines, args.limit)
            views = {name: engine.views for name, engine in engines.started.items()}
        summary = {"job": "query", "views": views,
                   "queries": [{"name": r.name, "engine": r.engine, "rows": r.table.num_rows,
                                "seconds": round(r.seconds, 3)} for r in results]}
        if args.out:
            write_result(results[0].table, args.out)
            print(f"{results[0].name}: {results[0].table.num_rows} rows written to {args.out}")
            return {**summary, "out": args.out}
        answers = [rows(r.table) for r in results]
        for r, answer in zip(results, answers):
            print(f"\n> {r.name} ({r.engine}, {r.seconds:.3f} s)\n{format_rows(answer, args.limit or SCREEN_ROWS)}")
        return {**summary, "results": answers}

    return cli.run_job("query", args, [], body)


def _queries(args):
    """The queries to run: --sql statements, then --file's (only --name's when given)."""
    from mumic_batch.sql.statements import Query, QueryError, parse_queries, select

    if args.name and not args.file:
        raise QueryError("--name picks queries from --file: give the file too")
    queries = [Query(f"sql_{i}", {"any": sql}) for i, sql in enumerate(args.sql, start=1)]
    if args.file:
        queries += select(parse_queries(Path(args.file).read_text()), args.name, args.file)
    if not queries:
        raise QueryError("no SQL given: pass --sql 'SELECT ...' or --file queries.sql [--name query]")
    if args.out and len(queries) != 1:
        raise QueryError(f"--out writes one result, but {len(queries)} queries were asked: pick one with --name")
    return queries


def _duckdb(cfg, stack: ExitStack):
    from mumic_batch.sql.duck import DuckEngine

    engine = DuckEngine(cfg.tables)
    stack.callback(engine.close)
    return engine


def _spark(cfg, stack: ExitStack):
    from mumic_batch.pipeline.query import JOB, SparkEngine
    from mumic_batch.spark.session import owned_session

    return SparkEngine(stack.enter_context(owned_session(cfg.spark, JOB)), cfg.tables)


if __name__ == "__main__":
    sys.exit(main())
