"""What an operator meets: leases, honest run accounting, failure thresholds, fail-fast inputs, --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import tag_images
from mumic_batch.config import SampleCfg, load_config
from mumic_batch.core import status as st
from mumic_batch.core.errors import RunStopped, failure_message
from mumic_batch.core.health import check_thresholds
from mumic_batch.core.sample import generate_sample
from mumic_batch.pipeline.sample import CATALOGUE
from mumic_batch.spark.session import local_task_attempts
from mumic_batch.tables.lease import Lease, LeaseHeld, LeaseLost, lease_path
from tests.fixtures.models import copy_artifact
from tests.fixtures.tagging import ROOT, run_tag_job, start_tag_job, tag_args

JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem != "__init__")


def run_job(capsys, args: list[str]) -> tuple[int, dict, str]:
    """Run the tagging job in this process: exit code, JSON summary, log."""
    code = tag_images.main(args)
    out = capsys.readouterr()
    return code, json.loads(out.out.strip().splitlines()[-1]), out.err


# --- pure pieces ------------------------------------------------------------------------------


def test_status_classes_cover_policy_transient_and_permanent():
    assert st.status_class(st.OK) == "ok"
    assert st.status_class(st.BLOCKED_PATH) == st.status_class(st.TOO_LARGE) == "policy"
    assert st.status_class(st.TIMEOUT) == st.status_class("http_503") == "transient"
    assert st.status_class(st.NOT_FOUND) == st.status_class("http_404") == st.status_class(st.DECODE_ERROR) == "permanent"
    # the fetcher retries within a run exactly the answers a later night retries
    assert {code for code in range(400, 600) if st.is_transient(st.http_status(code))} == st.TRANSIENT_HTTP
    assert st.status_class("http_501") == st.status_class("http_505") == "permanent"


def test_thresholds_name_the_broken_limit_and_the_top_statuses_with_examples():
    limits = {"permanent": 0.5, "transient": 0.5, "policy": 0.1}
    counts = {"ok": 80, "blocked_path": 15, "not_found": 5}
    examples = {"blocked_path": "/copy/data/a.jpg", "not_found": "/x/gone.jpg", "ok": "/y.jpg"}
    message = check_thresholds(counts, examples, limits, 0)
    assert message.startswith("15 of 100 rows (15.0%) failed with a policy status, above tag.max_error_rate.policy=0.1")
    assert "Top statuses: blocked_path 15 (e.g. /copy/data/a.jpg); not_found 5 (e.g. /x/gone.jpg)" in message
    assert check_thresholds(counts, examples, {**limits, "policy": 0.2}, 0) is None
    assert "0 rows came out ok, fewer than tag.min_ok_rows=1" in check_thresholds({}, {}, limits, 1)


def test_failure_message_is_the_cause_on_one_line():
    worker = RuntimeError("An exception was thrown from the Python worker.\nTraceback (most recent call last):\n"
                          '  File "x.py", line 1, in f\nmumic_batch.model.manifest.ArtifactError: sha256 mismatch '
                          "for /m/weights.safetensors: manifest aa, file bb; refusing to load\n")
    assert failure_message(worker) == ("ArtifactError: sha256 mismatch for /m/weights.safetensors: manifest aa, "
                                       "file bb; refusing to load")
    jvm = RuntimeError("An error occurred while calling o81.save.\n: org.apache.spark.SparkException: Job aborted.\n"
                       "\tat org.apache.spark.Foo(Foo.scala:1)")
    assert failure_message(jvm) == "SparkException: Job aborted."
    assert failure_message(ValueError("bad value\nsecond line")) == "ValueError: bad value"


def test_local_mode_defaults_to_task_retries():
    assert local_task_attempts(load_config(ROOT / "conf/local.yaml").spark.master) == 4
    assert local_task_attempts(load_config().spark.master) == 4
    assert local_task_attempts("local[2]") == local_task_attempts("local[*]") == 1
    assert local_task_attempts("spark://host:7077") is None


@pytest.mark.parametrize("args, names", [
    (["--set", "spark.conf={a: [1"], "--set 'spark.conf={a: [1'"),
    (["--config", "BAD"], "BAD"),
])
def test_yaml_syntax_error_is_a_one_line_config_error(capsys, tmp_path, args, names):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  master: [local\n")
    args = [str(bad) if a == "BAD" else a for a in args]
    code, summary, log = run_job(capsys, args)
    assert code == 2 and summary["ok"] is False
    assert "not valid YAML" in summary["error"] and "\n" not in summary["error"]
    assert (str(bad) if names == "BAD" else "spark.conf={a: [1") in summary["error"]
    assert "Traceback" not in log and "<unicode string>" not in log


# Every job's `python -m jobs.<job> --help`, run as __main__ in one interpreter (12 interpreters cost 30 s).
HELP_ALL = """
import contextlib, io, json, runpy, sys
answers = {}
for job in sys.argv[1:]:
    sys.argv, out, code = [job, "--help"], io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(f"jobs.{job}", run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    answers[job] = [code, out.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_texts(tmp_path_factory) -> tuple[dict, Path]:
    cwd = tmp_path_factory.mktemp("help")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *JOBS], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), cwd


@pytest.mark.parametrize("job", JOBS)
def test_help_describes_the_job_and_runs_nothing(help_texts, job):
    answers, cwd = help_texts
    code, text = answers[job]
    assert code == 0
    assert text.startswith("usage:") and len(text) > 200
    assert list(cwd.iterdir()) == [], "a job's --help wrote files"


# --- runs against real Spark and Delta ---------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple]:
    """12 sample images (image_id, uri, updated_at)."""
    sample = generate_sample(SampleCfg(out_dir=str(tmp_path_factory.mktemp("ops")), n_images=12, seed=5))
    return [(r.image_id, r.uri, r.updated_at.to_pydatetime()) for r in sample.catalogue.itertuples(index=False)]


@pytest.fixture
def catalogue(spark, images, tmp_path) -> str:
    path = str(tmp_path / "catalogue")
    spark.createDataFrame(images, CATALOGUE).write.format("delta").save(path)
    return path


def runs_rows(spark, tmp: Path) -> list:
    return spark.read.format("delta").load(str(tmp / "runs")).orderBy("started_at").collect()


def table_version(spark, path: Path) -> int:
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, str(path)).history(1).first()["version"]


@pytest.mark.spark
def test_a_night_where_every_row_is_blocked_writes_its_rows_and_fails(spark, capsys, tmp_path, catalogue, images,
                                                                     tiny_artifact):
    elsewhere = tmp_path / "not-the-images"
    elsewhere.mkdir()
    code, summary, _ = run_job(capsys, tag_args(tmp_path, catalogue, tiny_artifact,
                                                "--set", f"fetch.local_roots=[{elsewhere}]"))
    assert code == 1 and summary["ok"] is False
    assert summary["error"].startswith("ThresholdsExceeded: run ")
    assert "12 of 12 rows (100.0%) failed with a policy status" in summary["error"]
    assert f"blocked_path 12 (e.g. {min(uri for _, uri, _ in images)})" in summary["error"]
    run = runs_rows(spark, tmp_path)[-1]
    assert (run["outcome"], run["selected"], run["processed"], run["status_counts"]) == ("failed", 12, 12,
                                                                                       {"blocked_path": 12})
    assert run["message"] == summary["error"]
    assert spark.read.format("delta").load(str(tmp_path / "predictions")).count() == 12  # nothing lost


@pytest.mark.spark
def test_min_ok_rows_fails_a_run_with_nothing_to_do(spark, capsys, tmp_path, catalogue, tiny_artifact):
    args = tag_args(tmp_path, catalogue, tiny_artifact)
    assert run_job(capsys, args)[0] == 0
    code, summary, _ = run_job(capsys, [*args, "--set", "tag.min_ok_rows=1"])
    assert code == 1 and "0 rows came out ok, fewer than tag.min_ok_rows=1" in summary["error"]
    assert runs_rows(spark, tmp_path)[-1]["outcome"] == "failed"


@pytest.mark.spark
def test_corrupt_model_fails_even_with_nothing_to_score(spark, capsys, tmp_path, catalogue, tiny_artifact):
    assert run_job(capsys, tag_args(tmp_path, catalogue, tiny_artifact))[0] == 0
    tampered = copy_artifact(tiny_artifact, tmp_path / "tampered")
    weights = tampered / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    before = table_version(spark, tmp_path / "predictions")

    code, summary, log = run_job(capsys, tag_args(tmp_path, catalogue, tampered))

    assert code == 1 and summary["error"].startswith(f"ArtifactError: sha256 mismatch for {weights}")
    run = runs_rows(spark, tmp_path)[-1]
    assert run["outcome"] == "failed" and run["message"] == summary["error"]
    assert table_version(spark, tmp_path / "predictions") == before
    assert "Traceback" in log  # the traceback goes to the log only


@pytest.mark.spark
def test_integer_uri_column_is_refused_naming_column_and_type(spark, capsys, tmp_path, tiny_artifact):
    path = str(tmp_path / "catalogue")
    spark.createDataFrame([(f"id{i}", i) for i in range(3)], "image_id string, uri bigint").write.format(
        "delta").save(path)
    code, summary, _ = run_job(capsys, tag_args(tmp_path, path, tiny_artifact))
    assert code == 1
    assert summary["error"].startswith("TableError: catalogue column 'uri' has type bigint, not string")
    assert not (tmp_path / "predictions").exists()


@pytest.mark.spark
def test_a_second_run_of_a_version_exits_early_while_the_lease_is_held(spark, capsys, tmp_path, catalogue,
                                                                         tiny_artifact):
    from mumic_batch.model.manifest import read_manifest

    version = read_manifest(tiny_artifact).version
    holder = Lease(spark, str(tmp_path / "predictions"), version, "first-run", lease_s=600)
    holder.acquire()

    code, summary, _ = run_job(capsys, tag_args(tmp_path, catalogue, tiny_artifact))

    assert code == 3 and summary["outcome"] == "locked"
    assert summary["error"].startswith(f"LeaseHeld: model version {version} of {tmp_path / 'predictions'} is "
                                       "being tagged by run first-run")
    run = runs_rows(spark, tmp_path)[-1]
    assert (run["outcome"], run["processed"], run["selected"]) == ("locked", None, None)
    assert not (tmp_path / "predictions").exists() and not (tmp_path / "predictions__staging").exists()
    holder.release()
    summary = run_tag_job(capsys, tag_args(tmp_path, catalogue, tiny_artifact))[0]
    assert summary["processed"] == summary["selected"] == 12


@pytest.mark.spark
def test_a_run_has_released_its_lease_when_the_job_returns(spark, capsys, tmp_path, catalogue, tiny_artifact):
    """The release runs beside the runs-row write, and the job waits for it: a rerun is never locked out."""
    summary = run_tag_job(capsys, tag_args(tmp_path, catalogue, tiny_artifact))[0]
    assert summary["processed"] == 12
    assert spark.read.format("delta").load(lease_path(str(tmp_path / "predictions"))).collect() == []
    assert runs_rows(spark, tmp_path)[-1]["outcome"] == "succeeded"


@pytest.mark.spark
def test_an_expired_lease_is_taken_over_and_its_holder_cannot_commit(spark, tmp_path):
    predictions = str(tmp_path / "predictions")
    stalled = Lease(spark, predictions, "v1", "stalled-run", lease_s=0.001)
    stalled.acquire()
    time.sleep(0.01)
    Lease(spark, predictions, "v1", "next-run", lease_s=600).acquire()
    with pytest.raises(LeaseLost, match="lost its lease on model version v1 .* now held by run next-run"):
        stalled.check()
    Lease(spark, predictions, "v2", "other-version", lease_s=600).acquire()  # other versions are independent


@pytest.mark.spark
def test_two_runs_racing_for_one_lease_get_exactly_one(spark, tmp_path):
    predictions = str(tmp_path / "predictions")
    outcomes: dict[str, str] = {}

    def take(run_id: str) -> None:
        try:
            Lease(spark, predictions, "v1", run_id, lease_s=600).acquire()
            outcomes[run_id] = "held"
        except LeaseHeld:
            outcomes[run_id] = "refused"

    threads = [threading.Thread(target=take, args=(f"run-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["held", "refused"]
    rows = spark.read.format("delta").load(lease_path(predictions)).collect()
    assert [r["run_id"] for r in rows] == [k for k, v in outcomes.items() if v == "held"]


@pytest.mark.spark
def test_overlapping_runs_of_one_version_record_what_each_really_did(spark, capsys, tmp_path, catalogue,
                                                                     tiny_artifact):
    """A scheduler retry started while the first run scores: it exits, and both runs rows tell the truth."""
    args = tag_args(tmp_path, catalogue, tiny_artifact)
    log_file = tmp_path / "first.log"
    first = start_tag_job(args, log_file)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"holds the lease", log_file.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.1)
        code, second, _ = run_job(capsys, args)
    finally:
        assert first.wait(timeout=600) == 0, log_file.read_text()[-3000:]
    assert code == 3 and second["outcome"] == "locked"
    rows = {r["run_id"]: r for r in runs_rows(spark, tmp_path)}
    first_run = next(r for r in rows.values() if r["outcome"] == "succeeded")
    assert (first_run["selected"], first_run["processed"], first_run["chunks_merged"]) == (12, 12, 1)
    assert rows[second["run_id"]]["processed"] is None
    assert re.search(r"merged into predictions: 12 of 12 rows", log_file.read_text())
    again = run_tag_job(capsys, args)[0]
    assert (again["selected"], again["processed"]) == (0, 0)
    preds = spark.read.format("delta").load(str(tmp_path / "predictions"))
    assert preds.count() == 12 == preds.select("image_id").distinct().count()


def test_run_stopped_carries_outcome_and_exit_code():
    assert (RunStopped.outcome, RunStopped.exit_code) == ("failed", 1)
    assert (LeaseHeld.outcome, LeaseHeld.exit_code) == ("locked", 3)
