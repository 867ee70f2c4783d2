"""Every table on S3 (s3a) and the images too, against the moto server on loopback, through the jobs.

One driver process (tests/fixtures/s3tables.py) runs the whole scenario, since each Spark driver
with hadoop-aws costs a JVM and its Python workers: a catalogue and a labels table written to S3,
a tagging run, its rerun, an evaluation into a metrics table on S3, then two model versions tagging
one more predictions table at the same time. The tests check what each step left on S3.
"""

from __future__ import annotations

import pytest

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


def tables_args(bucket: str, predictions: str = "predictions") -> list[str]:
    return as_args([
        f"tables.catalogue={table('catalogue', bucket)}",
        f"tables.labels={table('labels', bucket)}",
        f"tables.predictions={table(predictions, bucket)}",
        f"tables.runs={table('runs', bucket)}",
        f"tables.metrics={table('metrics', bucket)}",
    ])


@pytest.fixture(scope="module")
def scenario(s3_server, tiny_artifact, tmp_path_factory) -> dict:
    """Run the scenario once; the steps' results by name, and the names of the objects left in the bucket."""
    work = tmp_path_factory.mktemp("s3-tables")
    other = work / "model-v2"
    write_tiny_artifact(other, version="tiny-untrained-v2", seed=1)
    uris = [s3_server.put(f"{PREFIX}/images/{i}.jpg", make_jpeg(64, 48, seed=i)) for i in range(IMAGES)]
    bucket, overrides = s3_server.bucket, s3a_overrides(s3_server)
    tag = job("tag_images", overrides, *tables_args(bucket), "--set", f"model.artifact={tiny_artifact}")

    def tag_both(version_artifact):
        return job("tag_images", overrides, *tables_args(bucket, "predictions_both"),
                   "--set", f"model.artifact={version_artifact}")

    steps = {
        "tag": tag,
        "rerun": tag,
        "evaluate": job("evaluate", overrides, *tables_args(bucket), "--set", f"model.artifact={tiny_artifact}",
                        "--set", f"evaluate.report_dir={work / 'reports'}"),
        "together": {"together": [tag_both(tiny_artifact), tag_both(other)]},
        "predictions": {"sql": f"SELECT image_id, model_version, status, run_id FROM delta.`{table('predictions', bucket)}`"},
        "both": {"sql": f"SELECT image_id, model_version, run_id FROM delta.`{table('predictions_both', bucket)}`"},
        "runs": {"sql": f"SELECT run_id, job, model_version, outcome, processed, source "
                        f"FROM delta.`{table('runs', bucket)}` ORDER BY started_at"},
        "metrics": {"sql": f"SELECT DISTINCT model_version, split FROM delta.`{table('metrics', bucket)}`"},
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
    tag_runs = runs_of(scenario, "tag_images")
    rerun = tag_runs[1]
    assert (rerun["outcome"], rerun["processed"]) == ("succeeded", 0)
    assert rerun["source"].startswith("s3a://")


def test_evaluation_appends_metrics_on_s3(scenario):
    assert scenario["evaluate"] == 0
    assert scenario["metrics"] == [{"model_version": "tiny-untrained-0", "split": "test"}]
    assert [r["outcome"] for r in runs_of(scenario, "evaluate")] == ["succeeded"]


def test_two_model_versions_tag_the_same_s3_table_at_once(scenario):
    # Both runs share one driver JVM, where Delta's default S3 LogStore serialises commits;
    # writers in separate drivers need the DynamoDB LogStore (docs/cluster.md).
    assert scenario["together"] == [0, 0]
    rows = scenario["both"]
    by_version: dict[str, set[str]] = {}
    for r in rows:
        by_version.setdefault(r["model_version"], set()).add(r["image_id"])
    assert len(rows) == 2 * IMAGES
    assert {v: len(ids) for v, ids in by_version.items()} == {"tiny-untrained-0": IMAGES,
                                                             "tiny-untrained-v2": IMAGES}
    run_ids = {r["run_id"] for r in rows}
    runs = {r["model_version"]: (r["outcome"], r["processed"]) for r in scenario["runs"] if r["run_id"] in run_ids}
    assert runs == {"tiny-untrained-0": ("succeeded", IMAGES), "tiny-untrained-v2": ("succeeded", IMAGES)}
