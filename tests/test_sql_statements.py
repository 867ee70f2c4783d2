"""Named queries, :parameters and result files, without any engine."""

from __future__ import annotations

import csv
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_batch.sql.statements import (
    QueryError,
    check_params,
    param_names,
    parse_queries,
    to_dollar_params,
    write_result,
)
from mumic_batch.sql.views import is_catalog_name

FILE = """-- name: a
-- First.
SELECT * FROM t WHERE x = :x AND y = ':not_a_param' AND z::int = :z;

SELECT 1;

-- name: b
SELECT aggregate(v, 0D, (s, e) -> s + e) FROM t WHERE id = :id;

-- name: b
-- engine: duckdb
SELECT list_sum(v) FROM t WHERE id = :id;
"""


def test_named_statements_and_engine_variants():
    queries = parse_queries(FILE)
    assert list(queries) == ["a", "statement_2", "b"]
    assert queries["b"].sql_for("spark").startswith("SELECT aggregate")
    assert queries["b"].sql_for("duckdb") == "SELECT list_sum(v) FROM t WHERE id = :id"
    assert queries["a"].sql_for("duckdb") == queries["a"].sql_for("spark")
    with pytest.raises(QueryError, match="defined twice"):
        parse_queries(FILE + "\n-- name: a\nSELECT 2;\n")


def test_parameters_outside_quotes_and_casts():
    sql = parse_queries(FILE)["a"].sql_for("spark")
    assert param_names(sql) == ["x", "z"]
    assert to_dollar_params(sql) == "SELECT * FROM t WHERE x = $x AND y = ':not_a_param' AND z::int = $z"
    with pytest.raises(QueryError, match=r"query a needs --param z=\.\.\."):
        check_params(parse_queries(FILE)["a"], "duckdb", {"x": "1", "unused": "2"})
    assert check_params(parse_queries(FILE)["a"], "duckdb", {"x": "1", "z": "2", "unused": "3"}) == {"x": "1", "z": "2"}


def test_catalog_names_and_paths():
    assert is_catalog_name("mumic.predictions") and is_catalog_name("cat.mumic.predictions")
    assert is_catalog_name("`my-db`.predictions")
    assert not is_catalog_name("data/out/predictions") and not is_catalog_name("predictions")
    assert not is_catalog_name("s3a://bucket/predictions") and not is_catalog_name("./out.delta")


def test_result_files_by_extension(tmp_path):
    when = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
    table = pa.table({
        "image_id": ["a", "b"],
        "labels": pa.array([["red"], []], pa.list_(pa.string())),
        "probs": pa.array([[("red", 0.5)], None], pa.map_(pa.string(), pa.float32())),
        "tagged_at": pa.array([when, None], pa.timestamp("us", tz="UTC")),
    })
    write_result(table, str(tmp_path / "r.parquet"))
    assert pq.read_table(tmp_path / "r.parquet").equals(table)
    write_result(table, str(tmp_path / "r.csv"))
    with open(tmp_path / "r.csv", newline="") as f:
        assert list(csv.reader(f)) == [["image_id", "labels", "probs", "tagged_at"],
                                       ["a", '["red"]', '{"red": 0.5}', "2026-11-30T12:00:00+00:00"],
                                       ["b", "[]", "", ""]]
    write_result(table, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())[0] == {
        "image_id": "a", "labels": ["red"], "probs": {"red": 0.5}, "tagged_at": "2026-11-30T12:00:00+00:00"}
    write_result(table, str(tmp_path / "r.jsonl"))
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    with pytest.raises(QueryError, match="unknown extension '.xlsx'"):
        write_result(table, str(tmp_path / "r.xlsx"))
