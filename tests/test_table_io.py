"""Delta table helpers of mumic_batch.tables.io on the local filesystem."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from delta.tables import DeltaTable

from mumic_batch.tables.io import delete_path, ensure_delta, list_dir
from mumic_batch.tables.schemas import RUNS

pytestmark = pytest.mark.spark

WRITERS = 4


def test_writers_creating_one_new_table_at_once_all_get_it(spark, tmp_path):
    # Two runs starting together on new tables (two model versions; a run and an evaluation sharing
    # the runs table) race to create them: every one must go on with the table, none fail.
    path = str(tmp_path / "runs")
    start = threading.Barrier(WRITERS)

    def create(_: int) -> int:
        start.wait()
        return len(ensure_delta(spark, path, RUNS).toDF().columns)

    with ThreadPoolExecutor(WRITERS) as pool:
        assert list(pool.map(create, range(WRITERS))) == [len(RUNS.fields)] * WRITERS
    assert DeltaTable.forPath(spark, path).history().count() == 1  # one creation commit


def test_list_dir_and_delete_path_use_hadoop_paths(spark, tmp_path):
    root = tmp_path / "staging"
    for name in ("run-b", "run-a"):
        (root / name).mkdir(parents=True)
        (root / name / "part-0").write_bytes(b"x")
    assert list_dir(spark, f"file://{root}") == ["run-a", "run-b"]
    delete_path(spark, f"file://{root}/run-a")
    assert list_dir(spark, str(root)) == ["run-b"]
    assert list_dir(spark, str(tmp_path / "absent")) == []
