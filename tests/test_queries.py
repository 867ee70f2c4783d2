"""docs/queries.sql on both engines (DuckDB and Spark) against tables a tagging job wrote: the answers
computed in Python; and jobs.query's options, errors and engine choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import query as query_job
from mumic_batch.pipeline.query import SparkEngine
from mumic_batch.sql.duck import DuckEngine
from mumic_batch.sql.statements import check_params, parse_queries, rows

pytestmark = pytest.mark.spark

QUERIES = Path(__file__).resolve().parents[1] / "docs" / "queries.sql"


@pytest.fixture(scope="module", params=["duckdb", "spark"])
def engine(request, spark, tagged_tables):
    if request.param == "duckdb":
        engine = DuckEngine(tagged_tables["tables"])
        yield engine
        engine.close()
    else:
        yield SparkEngine(spark, tagged_tables["tables"])


def run_named(engine, name: str, **params) -> list[dict]:
    query = parse_queries(QUERIES.read_text())[name]
    given = {k: str(v) for k, v in params.items()}
    return rows(engine.run(query.sql_for(engine.name), check_params(query, engine.name, given), None))


def ok_rows(tagged, version: str) -> list[dict]:
    return [p for p in tagged["preds"] if p["model_version"] == version and p["status"] == "ok"]


def scored(p: dict) -> dict[str, tuple[float, bool]]:
    """label -> (prob, assigned) over trained and zero-shot classes of one predictions row."""
    out = {k: (v, k in p["labels"]) for k, v in p["probs"].items()}
    out.update({k: (v, k in p["zero_shot_labels"]) for k, v in p["zero_shot_probs"].items()})
    return out


def query_args(tagged, *extra: str) -> list[str]:
    t = tagged["tables"]
    return ["--set", f"tables.predictions={t.predictions}", "--set", f"tables.runs={t.runs}",
            "--set", f"tables.catalogue={t.catalogue}", "--set", f"tables.labels={t.labels}",
            "--set", f"tables.metrics={t.metrics}", *extra]


def run_job(capsys, args: list[str]) -> tuple[int, dict, str]:
    code = query_job.main(args)
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.out


def test_every_query_in_the_file_is_checked():
    queries = parse_queries(QUERIES.read_text())
    assert set(queries) == {"label_filter", "label_counts", "version_changes", "nearest_neighbours",
                            "last_run_statuses"}
    assert all(q.sql_for("duckdb") and q.sql_for("spark") for q in queries.values())


def test_label_filter(engine, tagged_tables):
    ok = ok_rows(tagged_tables, tagged_tables["old"])
    cut = float(np.median([p["probs"]["red"] for p in ok]))
    got = run_named(engine, "label_filter", model_version=tagged_tables["old"], label="red", min_prob=cut)
    want = sorted(((p["image_id"], p["probs"]["red"]) for p in ok if p["probs"]["red"] >= cut),
                  key=lambda t: (-t[1], t[0]))
    assert [(r["image_id"], r["prob"]) for r in got] == want
    assert 0 < len(got) < len(ok)


def test_label_counts_include_zero_shot(engine, tagged_tables):
    got = run_named(engine, "label_counts", model_version=tagged_tables["new"])
    want = Counter()
    for p in ok_rows(tagged_tables, tagged_tables["new"]):
        want.update((label, False) for label in p["labels"])
        want.update((label, True) for label in p["zero_shot_labels"])
    assert {(r["label"], r["zero_shot"]): r["images"] for r in got} == dict(want)
    assert ("gradient", True) in want, "zero-shot classes are counted"


def test_version_changes_over_trained_and_zero_shot_classes(engine, tagged_tables):
    got = run_named(engine, "version_changes", old_version=tagged_tables["old"], new_version=tagged_tables["new"])
    old = {p["image_id"]: scored(p) for p in ok_rows(tagged_tables, tagged_tables["old"])}
    new = {p["image_id"]: scored(p) for p in ok_rows(tagged_tables, tagged_tables["new"])}
    want = sorted(
        (i, label, "gained" if new[i][label][1] else "lost")
        for i in old.keys() & new.keys() for label in old[i].keys() & new[i].keys()
        if old[i][label][1] != new[i][label][1]
    )
    assert [(r["image_id"], r["label"], r["change"]) for r in got] == want
    assert ("lost" in {c for _, label, c in want if label == "red"}), "red (trained, then zero-shot) is compared"
    assert all(label != "dots" for _, label, _ in want), "dots was scored by the new version only"


def test_nearest_neighbours(engine, tagged_tables):
    ok = ok_rows(tagged_tables, tagged_tables["old"])
    anchor = ok[0]["image_id"]
    got = run_named(engine, "nearest_neighbours", image_id=anchor, model_version=tagged_tables["old"])
    emb = {p["image_id"]: np.asarray(p["embedding"], dtype=np.float64) for p in ok}
    scores = {i: float(e @ emb[anchor]) for i, e in emb.items() if i != anchor}
    want = sorted(scores, key=lambda i: (-scores[i], i))[:5]
    assert [r["image_id"] for r in got] == want
    assert [r["cosine"] for r in got] == pytest.approx([scores[i] for i in want], abs=1e-9)


def test_last_run_statuses(engine, tagged_tables):
    got = run_named(engine, "last_run_statuses")
    ok = len(ok_rows(tagged_tables, tagged_tables["old"]))
    assert [(r["status"], r["images"]) for r in got] == [("ok", ok), ("not_found", 1)]
    assert got[0]["example_error"] is None and "missing.jpg" in got[1]["example_error"]


def test_named_query_answers_on_duckdb_and_writes_the_file(capsys, tagged_tables, tmp_path):
    out = tmp_path / "changes.parquet"
    code, summary, _ = run_job(capsys, query_args(
        tagged_tables, "--file", str(QUERIES), "--name", "version_changes", "--out", str(out),
        "--param", f"old_version={tagged_tables['old']}", "--param", f"new_version={tagged_tables['new']}"))
    assert code == 0, summary
    assert [q["engine"] for q in summary["queries"]] == ["duckdb"]
    assert list(summary["views"]) == ["duckdb"], "Spark was never started"
    written = pq.read_table(out).to_pylist()
    assert len(written) == summary["queries"][0]["rows"] > 0
    assert set(written[0]) == {"image_id", "label", "change", "old_zero_shot", "old_prob", "new_zero_shot",
                               "new_prob"}


def test_the_duckdb_path_never_imports_pyspark(tagged_tables):
    """A named query on path tables, in a fresh process: answered without importing pyspark (so no JVM)."""
    args = query_args(tagged_tables, "--file", str(QUERIES), "--name", "label_counts",
                      "--param", f"model_version={tagged_tables['old']}")
    code = ("import json, sys; from jobs import query; rc = query.main(json.loads(sys.argv[1])); "
            "sys.exit(rc or (3 if 'pyspark' in sys.modules else 0))")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["queries"][0]["engine"] == "duckdb"


def test_limit_and_csv(capsys, tagged_tables, tmp_path):
    out = tmp_path / "rows.csv"
    code, summary, _ = run_job(capsys, query_args(
        tagged_tables, "--sql", "SELECT image_id, labels, probs FROM predictions ORDER BY image_id",
        "--limit", "3", "--out", str(out)))
    assert code == 0, summary
    lines = out.read_text().splitlines()
    assert lines[0] == "image_id,labels,probs" and len(lines) == 4
    assert summary["queries"][0]["rows"] == 3


def test_missing_parameter_names_it(capsys, tagged_tables):
    code, summary, _ = run_job(capsys, query_args(tagged_tables, "--file", str(QUERIES), "--name", "label_filter",
                                                  "--param", "label=red"))
    assert code == 1
    assert "query label_filter needs --param model_version=... --param min_prob=..." in summary["error"]


def test_unknown_names_list_what_exists(capsys, tagged_tables):
    code, summary, _ = run_job(capsys, query_args(tagged_tables, "--file", str(QUERIES), "--name", "nope"))
    assert code == 1 and "its queries: label_filter, label_counts, version_changes" in summary["error"]
    code, summary, _ = run_job(capsys, query_args(tagged_tables, "--sql", "SELECT * FROM prediction"))
    assert code == 1
    assert "views: catalogue, predictions, runs, label_probs" in summary["error"]


def test_spark_sql_that_duckdb_rejects_runs_on_spark(capsys, tagged_tables):
    sql = "SELECT count(*) AS n FROM predictions LATERAL VIEW explode(probs) p AS label, prob"
    code, summary, _ = run_job(capsys, query_args(tagged_tables, "--sql", sql))
    assert code == 0, summary
    assert summary["queries"][0]["engine"] == "spark"
    want = sum(len(p["probs"]) for p in tagged_tables["preds"] if p["probs"])
    assert summary["results"] == [[{"n": want}]]


def test_query_job_runs_the_file_on_spark(capsys, tagged_tables):
    old = tagged_tables["old"]
    code, summary, out = run_job(capsys, query_args(
        tagged_tables, "--engine", "spark", "--file", str(QUERIES),
        "--param", f"model_version={old}", "--param", "label=red", "--param", "min_prob=0.5",
        "--param", f"old_version={old}", "--param", f"new_version={tagged_tables['new']}",
        "--param", f"image_id={ok_rows(tagged_tables, old)[0]['image_id']}"))
    assert code == 0, summary
    assert [q["engine"] for q in summary["queries"]] == ["spark"] * 5
    assert "label_probs" in summary["views"]["spark"] and "> version_changes (spark" in out
