"""Every Python example of docs/sql.md runs as written (DuckDB, polars, delta-rs) against tables a tagging
job wrote, from a directory where they sit at the demo's paths, and gives the right answers."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.spark

DOC = Path(__file__).resolve().parents[1] / "docs" / "sql.md"


@pytest.fixture(scope="module")
def examples(tagged_tables, tmp_path_factory):
    """The namespace after running the doc's Python blocks in order, from a directory holding data/out/."""
    cwd = tmp_path_factory.mktemp("sql-docs")
    (cwd / "data" / "out").mkdir(parents=True)
    for name in ("predictions", "runs"):
        (cwd / "data" / "out" / name).symlink_to(getattr(tagged_tables["tables"], name))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    namespace: dict = {}
    before = Path.cwd()
    os.chdir(cwd)
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the doc's own examples
    finally:
        os.chdir(before)
    return namespace


def ok_rows(tagged_tables) -> list[dict]:
    return [p for p in tagged_tables["preds"] if p["status"] == "ok"]


def test_duckdb_reads_the_table_and_label_probs(examples, tagged_tables):
    preds = tagged_tables["preds"]
    want = Counter((p["model_version"], p["status"]) for p in preds)
    assert examples["images"] == sorted((v, s, n) for (v, s), n in want.items())
    counts = Counter()
    for p in ok_rows(tagged_tables):
        counts.update((p["model_version"], label, False) for label in p["labels"])
        counts.update((p["model_version"], label, True) for label in p["zero_shot_labels"])
    assert sorted(examples["label_counts"]) == sorted((v, lb, z, n) for (v, lb, z), n in counts.items())
    assert len(examples["neighbours"]) == 5


def test_parquet_files_give_the_wrong_count(examples, tagged_tables):
    assert examples["through_delta"] == len(tagged_tables["preds"])
    assert examples["raw_files"] > examples["through_delta"], "the fixture MERGEs rows: replaced files remain"


def test_polars_reads_the_table_with_deletion_vectors(examples, tagged_tables):
    want = Counter(p["model_version"] for p in ok_rows(tagged_tables))
    assert dict(examples["per_version"].iter_rows()) == dict(want)
    trained = Counter((p["model_version"], label) for p in ok_rows(tagged_tables) for label in p["labels"])
    got = examples["trained"].filter(examples["pl"].col("assigned")).group_by("model_version", "label").len()
    assert {(v, lb): n for v, lb, n in got.iter_rows()} == dict(trained)
    assert examples["recent_runs"].height == 3


def test_delta_rs_refuses_deletion_vectors_as_documented(examples):
    assert len(examples["runs"]) == 3
    assert "deletionVectors" in examples["refused"]
