"""Delta table helpers of mumic_batch.tables.io on the local filesystem."""

from __future__ import annotations

import logging
import shutil
import threading
import time
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


def test_a_writer_waits_for_a_table_another_writer_is_still_creating(spark, tmp_path, caplog):
    # The DynamoDB LogStore writes a first commit to _delta_log/.tmp/ and copies it into place later:
    # meanwhile the location holds a log without a table, and Delta refuses to create one there.
    path, winner = tmp_path / "runs", tmp_path / "winner"
    ensure_delta(spark, str(winner), RUNS)  # the other writer's table, whose first commit will land at `path`
    pending = path / "_delta_log" / ".tmp"
    pending.mkdir(parents=True)
    (pending / "00000000000000000000.json.a1b2").write_text("{}")
    caplog.set_level(logging.INFO, logger="mumic_batch.tables.io")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ensure_delta, spark, str(path), RUNS)
        while not any("being created by a concurrent writer" in r.getMessage() for r in caplog.records):
            assert not waiting.done(), str(waiting.exception())[:800]
            time.sleep(0.1)
        shutil.copy(winner / "_delta_log" / "00000000000000000000.json", path / "_delta_log")
        assert len(waiting.result().toDF().columns) == len(RUNS.fields)
    assert DeltaTable.forPath(spark, str(path)).history().count() == 1


def test_list_dir_and_delete_path_use_hadoop_paths(spark, tmp_path):
    root = tmp_path / "staging"
    for name in ("run-b", "run-a"):
        (root / name).mkdir(parents=True)
        (root / name / "part-0").write_bytes(b"x")
    assert list_dir(spark, f"file://{root}") == ["run-a", "run-b"]
    delete_path(spark, f"file://{root}/run-a")
    assert list_dir(spark, str(root)) == ["run-b"]
    assert list_dir(spark, str(tmp_path / "absent")) == []
