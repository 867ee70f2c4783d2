"""Every table on S3 (s3a) and the images too, against the moto server on loopback, through the jobs.

One driver process (tests/fixtures/s3tables.py) runs the single-writer scenario, since each Spark
driver with hadoop-aws costs a JVM and its Python workers: a catalogue and a labels table written to
S3, a tagging run, its rerun, an evaluation into a metrics table on S3. Then two drivers tag one new
predictions table with two model versions at the same time, committing through Delta's DynamoDB
LogStore on moto's DynamoDB (tests/fixtures/logstore.py), and a third driver reads the result.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures.logstore import DDB_TABLE, dynamodb_endpoint, logstore_jar, logstore_overrides
from tests.fixtures.models import write_tiny_artifact
from tests.fixtures.net import make_jpeg
from tests.fixtures.s3tables import as_args, run_s3_driver, s3a_overrides

pytestmark = [pytest.mark.spark, pytest.mark.slow]

IMAGES = 6
PREFIX = "s3-tables"


def table(name: str, bucket: str) -> str:
    return f"s3a://{bucket}/{PREFIX}/{name}"


def create_tables(bucket: str, uris: list[str]) -> list[dict]:
    """SQL steps writing the catalogue and labels Delta tables on S3."""
    rows = ", ".join(f"('img{i}', '{uri}', TIMESTAMP '2026-01-01 00:00:00')" for i, uri in enumerate(uris))
    labels = ", ".join(f"('img{i}', 'test', array('{'red' if i % 2 else 'blue'}'))" for i in range(len(uris)))
    return [
        {"sql": f"CREATE TABLE delta.`{table('catalogue', bucket)}` USING delta AS "
                f"SELECT * FROM VALUES {rows} AS t(image_id, uri, updated_at)"},
        {"sql": f"CREATE TABLE delta.`{table('labels', bucket)}` USING delta AS "
                f"SELECT * FROM VALUES {labels} AS t(image_id, split, labels)"},
    ]


def job(name: str, overrides: list[str], *args: str) -> dict:
    return {"job": name, "args": [*as_args(overrides), *args]}


def tables_args(bucket: str) -> list[str]:
    return as_args([
        f"tables.catalogue={table('catalogue', bucket)}",
        f"tables.labels={table('labels', bucket)}",
        f"tables.predictions={table('predictions', bucket)}",
        f"tables.runs={table('runs', bucket)}",
        f"tables.metrics={table('metrics', bucket)}",
    ])


@pytest.fixture(scope="module")
def scenario(s3_server, tiny_artifact, tmp_path_factory) -> dict:
    """Run the scenario once; the steps' results by name, and the names of the objects left in the bucket."""
    work = tmp_path_factory.mktemp("s3-tables")
    uris = [s3_server.put(f"{PREFIX}/images/{i}.jpg", make_jpeg(64, 48, seed=i)) for i in range(IMAGES)]
    bucket, overrides = s3_server.bucket, s3a_overrides(s3_server)
    tag = job("tag_images", overrides, *tables_args(bucket), "--set", f"model.artifact={tiny_artifact}")
    steps = {
        "tag": tag,
        "rerun": tag,
        "evaluate": job("evaluate", overrides, *tables_args(bucket), "--set", f"model.artifact={tiny_artifact}",
                        "--set", f"evaluate.report_dir={work / 'reports'}"),
        "predictions": {"sql": "SELECT image_id, model_version, status, run_id "
                               f"FROM delta.`{table('predictions', bucket)}`"},
        "runs": {"sql": f"SELECT run_id, job, model_version, outcome, processed, source "
                        f"FROM delta.`{table('runs', bucket)}` ORDER BY started_at"},
        "metrics": {"sql": f"SELECT DISTINCT model_version, split FROM delta.`{table('metrics', bucket)}`"},
        "jars": {"sql": "SET spark.jars"},  # the packages' jars, to compile the LogStore against
    }
    results = run_s3_driver(s3_server, overrides, [*create_tables(bucket, uris), *steps.values()], work)
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")
    return {**dict(zip(steps, results[2:])), "keys": [o["Key"] for o in listing.get("Contents", [])]}


def runs_of(scenario: dict, job_name: str) -> list[dict]:
    return [r for r in scenario["runs"] if r["job"] == job_name]


def test_tagging_run_writes_one_row_per_image_to_s3_tables(scenario):
    assert scenario["tag"] == 0
    rows = scenario["predictions"]
    assert len(rows) == IMAGES and len({r["image_id"] for r in rows}) == IMAGES
    assert {r["status"] for r in rows} == {"ok"}  # every image read from S3
    first = runs_of(scenario, "tag_images")[0]
    assert (first["outcome"], first["processed"]) == ("succeeded", IMAGES)
    assert {r["run_id"] for r in rows} == {first["run_id"]}
    keys = scenario["keys"]
    for name in ("catalogue", "predictions", "runs", "metrics"):
        assert f"{PREFIX}/{name}/_delta_log/00000000000000000000.json" in keys, name
    # The staging data of every run is gone from S3 (list_dir/delete_path through Hadoop's FileSystem).
    assert not [k for k in keys if "__staging/" in k and not k.endswith("__staging/")]


def test_rerun_on_s3_processes_nothing(scenario):
    assert scenario["rerun"] == 0
    rerun = runs_of(scenario, "tag_images")[1]
    assert (rerun["outcome"], rerun["processed"]) == ("succeeded", 0)
    assert rerun["source"].startswith("s3a://")


def test_evaluation_appends_metrics_on_s3(scenario):
    assert scenario["evaluate"] == 0
    assert scenario["metrics"] == [{"model_version": "tiny-untrained-0", "split": "test"}]
    assert [r["outcome"] for r in runs_of(scenario, "evaluate")] == ["succeeded"]


@pytest.fixture(scope="module")
def two_drivers(scenario, s3_server, tiny_artifact, tmp_path_factory) -> dict:
    """Three driver processes tag one new predictions table at the same time, committing through the
    DynamoDB LogStore: two model versions, and a second run of the first version (a scheduler retry)
    that must find the lease taken; then a fourth driver reads what they left."""
    work = tmp_path_factory.mktemp("logstore")
    other = work / "model-v2"
    write_tiny_artifact(other, version="tiny-untrained-v2", seed=1)
    jar = logstore_jar(work, [j.removeprefix("file:") for j in scenario["jars"][0]["value"].split(",")])
    bucket, plain = s3_server.bucket, s3a_overrides(s3_server)
    paths = as_args([f"tables.catalogue={table('catalogue', bucket)}", f"tables.predictions={table('ddb', bucket)}",
                     f"tables.runs={table('ddb_runs', bucket)}"])
    with dynamodb_endpoint(s3_server, work) as java_options:
        overrides = [*plain, *logstore_overrides(jar, java_options)]
        drivers = [(work / name, artifact)
                   for name, artifact in (("one", tiny_artifact), ("two", other), ("retry", tiny_artifact))]
        for folder, _ in drivers:
            folder.mkdir()
        with ThreadPoolExecutor(len(drivers)) as pool:
            codes = list(pool.map(
                lambda d: run_s3_driver(s3_server, overrides, [job("tag_images", overrides, *paths, "--set",
                                                                   f"model.artifact={d[1]}")], d[0])[0],
                drivers))
    (work / "read").mkdir()
    rows, runs = run_s3_driver(s3_server, plain, [
        {"sql": f"SELECT image_id, model_version FROM delta.`{table('ddb', bucket)}`"},
        {"sql": "SELECT model_version, outcome, processed, started_at, ended_at "
                f"FROM delta.`{table('ddb_runs', bucket)}`"},
    ], work / "read")
    entries = boto3_dynamodb(s3_server).scan(TableName=DDB_TABLE)["Items"]
    failed = [(folder / "driver.log").read_text()[-6000:] for (folder, _), code in zip(drivers, codes) if code == 1]
    return {"codes": codes, "rows": rows, "runs": runs, "entries": entries, "table": table("ddb", bucket),
            "failed_logs": failed}


def boto3_dynamodb(server):
    import boto3

    return boto3.session.Session().client(
        "dynamodb", endpoint_url=server.endpoint_url, region_name=server.region,
        aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"])


def test_two_drivers_commit_two_versions_through_the_dynamodb_logstore(two_drivers):
    one, two, retry = two_drivers["codes"]
    assert two == 0 and sorted((one, retry)) == [0, 3], "\n".join(two_drivers["failed_logs"])
    rows = two_drivers["rows"]
    assert len(rows) == 2 * IMAGES
    assert {(r["model_version"], r["image_id"]) for r in rows} == {
        (v, f"img{i}") for v in ("tiny-untrained-0", "tiny-untrained-v2") for i in range(IMAGES)}
    runs = two_drivers["runs"]
    assert sorted((r["model_version"], r["outcome"], r["processed"]) for r in runs) == [
        ("tiny-untrained-0", "locked", None), ("tiny-untrained-0", "succeeded", IMAGES),
        ("tiny-untrained-v2", "succeeded", IMAGES)]  # the same version's second run exited through the lease
    done = [r for r in runs if r["outcome"] == "succeeded"]
    assert max(r["started_at"] for r in done) < min(r["ended_at"] for r in done)  # the runs overlapped
    # Every commit of the predictions table went through DynamoDB: one complete entry per log version.
    commits = sorted(e["fileName"]["S"] for e in two_drivers["entries"]
                     if e["tablePath"]["S"] == two_drivers["table"])
    assert commits == [f"{v:020d}.json" for v in range(len(commits))] and len(commits) >= 3
    assert {e["complete"]["S"] for e in two_drivers["entries"]} == {"true"}
