"""How long `jobs.query` takes to answer one named query of docs/queries.sql, as a user runs it: a new
process each time, from start to exit, on DuckDB (no JVM) and, with --spark, on Spark.

    .venv/bin/python bench/query_latency.py                # after `make demo`: the demo's tables
    .venv/bin/python bench/query_latency.py --runs 10 --spark

The two model versions come from the predictions table (the fine-tuned one tagged first, the base one
second, as the demo does). Prints a table and the machine; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine_line  # noqa: E402
from mumic_batch.config import load_config  # noqa: E402
from mumic_batch.sql.duck import DuckEngine  # noqa: E402

QUERIES = ("label_counts", "version_changes", "nearest_neighbours")


def parameters(config: str) -> dict[str, str]:
    """Query parameters from the tables: versions in the order they were first tagged, an ok image."""
    engine = DuckEngine(load_config(config, []).tables)
    versions = engine.run("SELECT model_version, min(tagged_at) AS first FROM predictions GROUP BY ALL ORDER BY first",
                          {}, None).column("model_version").to_pylist()
    if len(versions) < 2:
        raise SystemExit(f"need two model versions in predictions (run `make demo`), found {versions}")
    new, old = versions[0], versions[1]
    image = engine.run("SELECT min(image_id) AS i FROM predictions WHERE status = 'ok' AND model_version = $v",
                       {"v": new}, None).column("i")[0].as_py()
    engine.close()
    return {"model_version": new, "old_version": old, "new_version": new, "image_id": image}


def one_run(config: str, name: str, engine: str, params: dict[str, str]) -> tuple[float, dict]:
    needed = {"label_counts": ["model_version"], "version_changes": ["old_version", "new_version"],
              "nearest_neighbours": ["image_id", "model_version"]}[name]
    cmd = [sys.executable, "-m", "jobs.query", "--config", config, "--file", "docs/queries.sql", "--name", name,
           "--engine", engine, "--log-level", "WARNING", *(a for k in needed for a in ("--param", f"{k}={params[k]}"))]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {summary}")
    return wall, summary["queries"][0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="conf/local.yaml")
    p.add_argument("--runs", type=int, default=5, help="processes per query on DuckDB")
    p.add_argument("--spark", action="store_true", help="also one run per query on Spark (about a minute each)")
    args = p.parse_args()
    params = parameters(args.config)
    rows = []
    for engine, runs in (("duckdb", args.runs), *((("spark", 1),) if args.spark else ())):
        for name in QUERIES:
            results = [one_run(args.config, name, engine, params) for _ in range(runs)]
            walls = [w for w, _ in results]
            rows.append({"query": name, "engine": engine, "runs": runs, "answer_rows": results[0][1]["rows"],
                         "median_wall_s": round(statistics.median(walls), 2), "max_wall_s": round(max(walls), 2),
                         "query_s": round(statistics.median(r["seconds"] for _, r in results), 3),
                         "load": round(os.getloadavg()[0], 1)})
    print(machine_line())
    print(f"{'query':<20} {'engine':<7} {'runs':>4} {'rows':>5} {'median s':>9} {'max s':>7} {'query s':>8} "
          f"{'load':>5}")
    for r in rows:
        print(f"{r['query']:<20} {r['engine']:<7} {r['runs']:>4} {r['answer_rows']:>5} {r['median_wall_s']:>9} "
              f"{r['max_wall_s']:>7} {r['query_s']:>8} {r['load']:>5}")
    print(json.dumps({"params": params, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
