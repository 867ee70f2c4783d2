"""Nearest-neighbour search over a model version's stored embeddings (the version of model.artifact).

  build   (Spark) an HNSW index (usearch, cosine) of every ok row's embedding, kept under
          search.index_dir/<version>/ next to the tables, and the near-duplicate groups (same
          content_sha256, or cosine >= search.duplicate_cosine) written to the search.duplicates
          Delta table; reports recall@top_k of the index against exact search on a sample of the
          indexed images. Rebuild after tagging runs: rows tagged later are not in the index.
  query   (no Spark) top k images, with cosine scores, for each --text (through the model's text
          tower) and each --image-id (the stored embedding of that image; the image itself is left
          out); printed, and written to --out FILE (.csv, .parquet or .json).

  python -m jobs.search build --config conf/local.yaml
  python -m jobs.search query --config conf/local.yaml --text "a photo with a purple digit" --out hits.csv

Last stdout line: a JSON summary (build: rows, recall, duplicate groups; query: every result row).
"""

from __future__ import annotations

import argparse
import sys

from mumic_batch import cli


def parse(argv: list[str] | None) -> argparse.Namespace:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="{build,query}")
    build = commands.add_parser("build", help="build the index and the near-duplicate groups (Spark)")
    query = commands.add_parser("query", help="top k images for texts and image ids (no Spark)")
    for p in (build, query):
        p.add_argument("--config", metavar="FILE", help=cli.CONFIG_HELP)
        p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                       help=cli.SET_HELP)
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    query.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    query.add_argument("--image-id", action="append", default=[], help="an image id to find neighbours of (repeatable)")
    query.add_argument("--k", type=int, default=None, help="results per query (default search.top_k)")
    query.add_argument("--out", help="also write the results to this .csv, .parquet or .json file")
    return top.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "build":
        return cli.run_job("search", args, [], cli.pipeline_body("search"))

    def body(cfg):
        from mumic_batch.pipeline import search
        from mumic_batch.sql.statements import format_rows

        rows = search.query(cfg, args.text, args.image_id, args.k or cfg.search.top_k)
        if args.out:
            search.write_results(rows, args.out)
        print(format_rows(rows, limit=len(rows)))
        return {"job": "search_query", "results": rows, "out": args.out}

    return cli.run_job("search", args, [], body)


if __name__ == "__main__":
    sys.exit(main())
