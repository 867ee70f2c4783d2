"""The tagging job end to end on real local Spark and real Delta tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import tag_images
from mumic_batch.config import SampleCfg
from mumic_batch.core import status as st
from mumic_batch.core.ids import image_id_for
from mumic_batch.core.sample import generate_sample
from mumic_batch.pipeline.sample import CATALOGUE
from tests.fixtures.tagging import run_tag_job, tag_args

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def catalogue_rows(tmp_path_factory) -> list[tuple]:
    """16 sample images plus a corrupt file and a missing one (image_id, uri, updated_at)."""
    root = tmp_path_factory.mktemp("catalogue")
    sample = generate_sample(SampleCfg(out_dir=str(root), n_images=16, seed=3))
    rows = [(r.image_id, r.uri, r.updated_at.to_pydatetime()) for r in sample.catalogue.itertuples(index=False)]
    corrupt = root / "images" / "corrupt.jpg"
    corrupt.write_bytes(b"this file is not an image at all " * 10)
    missing = root / "images" / "missing.jpg"
    stamp = rows[0][2]
    return rows + [(image_id_for(str(corrupt)), str(corrupt), stamp), (image_id_for(str(missing)), str(missing), stamp)]


def write_catalogue(spark, rows, path: Path, fmt: str) -> str:
    spark.createDataFrame(rows, CATALOGUE).write.format(fmt).mode("overwrite").save(str(path))
    return str(path)


def run_tag(capsys, tmp: Path, catalogue: str, artifact: Path, *extra: str) -> dict:
    return run_tag_job(capsys, tag_args(tmp, catalogue, artifact, *extra))[0]


def predictions(spark, tmp: Path):
    return spark.read.format("delta").load(str(tmp / "predictions"))


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_one_row_per_image_with_statuses(spark, capsys, tmp_path, catalogue_rows, tiny_artifact, fmt):
    catalogue = write_catalogue(spark, catalogue_rows, tmp_path / "catalogue", fmt)
    summary = run_tag(capsys, tmp_path, catalogue, tiny_artifact)
    rows = {r["image_id"]: r for r in predictions(spark, tmp_path).collect()}
    assert len(rows) == len(catalogue_rows) == summary["input_rows"] == summary["processed"]
    by_uri = {r["uri"]: r for r in rows.values()}
    corrupt = next(u for u in by_uri if u.endswith("corrupt.jpg"))
    missing = next(u for u in by_uri if u.endswith("missing.jpg"))
    assert by_uri[corrupt]["status"] == st.DECODE_ERROR and by_uri[corrupt]["error"]
    assert by_uri[missing]["status"] == st.NOT_FOUND and by_uri[missing]["error"]
    good = [r for u, r in by_uri.items() if u not in (corrupt, missing)]
    assert {r["status"] for r in good} == {st.OK}
    assert summary["status_counts"] == {st.OK: len(good), st.DECODE_ERROR: 1, st.NOT_FOUND: 1}


def test_ok_rows_carry_probabilities_embeddings_and_model(spark, capsys, tmp_path, catalogue_rows, tiny_artifact):
    from mumic_batch.model.manifest import read_manifest

    manifest = read_manifest(tiny_artifact)
    catalogue = write_catalogue(spark, catalogue_rows, tmp_path / "catalogue", "delta")
    run_tag(capsys, tmp_path, catalogue, tiny_artifact)
    ok = predictions(spark, tmp_path).where("status = 'ok'").collect()
    names = {c.name for c in manifest.classes}
    for row in ok:
        assert set(row["probs"]) == names
        assert all(0.0 <= p <= 1.0 for p in row["probs"].values())
        assert set(row["labels"]) == {c.name for c in manifest.classes if row["probs"][c.name] >= c.threshold}
        norm = sum(x * x for x in row["embedding"]) ** 0.5
        assert abs(norm - 1.0) < 1e-4
        assert len(row["embedding"]) == manifest.embed_dim
        assert row["model_version"] == manifest.version and row["model_sha256"] == manifest.weights_sha256
        assert row["width"] == 640 and row["height"] == 480 and len(row["content_sha256"]) == 64
    from delta.tables import DeltaTable

    detail = DeltaTable.forPath(spark, str(tmp_path / "predictions")).detail().first()
    assert detail["partitionColumns"] == ["model_version"]
    assert detail["properties"]["delta.enableChangeDataFeed"] == "true"


def test_rerun_adds_no_rows_and_says_so(spark, capsys, tmp_path, catalogue_rows, tiny_artifact):
    catalogue = write_catalogue(spark, catalogue_rows, tmp_path / "catalogue", "delta")
    run_tag(capsys, tmp_path, catalogue, tiny_artifact)
    first = predictions(spark, tmp_path).count()
    versions_before = table_versions(spark, tmp_path / "predictions")
    again = run_tag(capsys, tmp_path, catalogue, tiny_artifact)
    assert again["processed"] == 0
    assert table_versions(spark, tmp_path / "predictions") == versions_before  # nothing written at all
    assert predictions(spark, tmp_path).count() == first
    full = run_tag(capsys, tmp_path, catalogue, tiny_artifact, "--full")
    assert full["processed"] == len(catalogue_rows) and full["selection"] == "full"
    assert predictions(spark, tmp_path).count() == first
    assert {r["attempts"] for r in predictions(spark, tmp_path).collect()} == {2}
    runs = spark.read.format("delta").load(str(tmp_path / "runs")).orderBy("started_at").collect()
    assert [r["processed"] for r in runs] == [len(catalogue_rows), 0, len(catalogue_rows)]
    assert "nothing to do" in runs[1]["message"]
    assert set(runs[0]["stage_seconds"]) == {"select", "warm_up_wait", "fetch", "decode", "infer", "score_wall", "score_idle", "write"}
    assert runs[0]["images_per_s"] > 0 and runs[0]["status_counts"] == {"ok": len(catalogue_rows) - 2,
                                                                         "decode_error": 1, "not_found": 1}
    assert all(r["outcome"] == "succeeded" and json.loads(r["config"])["tables"] for r in runs)


def table_versions(spark, path: Path) -> int:
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, str(path)).history().count()


@pytest.mark.parametrize("change_feed", [False, True])
def test_new_images_only_are_processed(spark, capsys, tmp_path, catalogue_rows, tiny_artifact, change_feed):
    path = tmp_path / "catalogue"
    first, new = catalogue_rows[:-10], catalogue_rows[-10:]
    writer = spark.createDataFrame(first, CATALOGUE).write.format("delta")
    if change_feed:
        writer = writer.option("delta.enableChangeDataFeed", "true")
    writer.save(str(path))
    assert run_tag(capsys, tmp_path, str(path), tiny_artifact)["processed"] == len(first)
    spark.createDataFrame(new, CATALOGUE).write.format("delta").mode("append").save(str(path))
    summary = run_tag(capsys, tmp_path, str(path), tiny_artifact)
    assert summary["processed"] == 10
    assert summary["selection"] == ("change_feed" if change_feed else "anti_join")
    assert predictions(spark, tmp_path).count() == len(catalogue_rows)
    assert run_tag(capsys, tmp_path, str(path), tiny_artifact)["processed"] == 0


def test_changed_uri_or_timestamp_is_retagged(spark, capsys, tmp_path, catalogue_rows, tiny_artifact):
    from datetime import timedelta

    path = tmp_path / "catalogue"
    write_catalogue(spark, catalogue_rows, path, "delta")
    run_tag(capsys, tmp_path, str(path), tiny_artifact)
    touched = [(i, u, t + timedelta(days=1)) for i, u, t in catalogue_rows[:3]] + catalogue_rows[3:]
    write_catalogue(spark, touched, path, "delta")
    assert run_tag(capsys, tmp_path, str(path), tiny_artifact)["processed"] == 3
    rows = {r["image_id"]: r for r in predictions(spark, tmp_path).collect()}
    for image_id, _, stamp in touched[:3]:
        assert rows[image_id]["attempts"] == 1
        assert rows[image_id]["source_updated_at"] == stamp.replace(tzinfo=None)  # session time zone is UTC


def test_bad_artifact_fails_the_job_and_records_the_run(spark, capsys, tmp_path, catalogue_rows):
    catalogue = write_catalogue(spark, catalogue_rows, tmp_path / "catalogue", "delta")
    code = tag_images.main(["--set", f"tables.catalogue={catalogue}", "--set", f"tables.runs={tmp_path / 'runs'}",
                            "--set", f"tables.predictions={tmp_path / 'predictions'}",
                            "--set", f"model.artifact={tmp_path / 'no-such-model'}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and summary["ok"] is False and "no-such-model" in summary["error"]
    run = spark.read.format("delta").load(str(tmp_path / "runs")).collect()
    assert [r["outcome"] for r in run] == ["failed"]


def test_missing_catalogue_is_named(capsys, spark, tmp_path, tiny_artifact):
    code = tag_images.main(["--set", f"tables.catalogue={tmp_path / 'nothing-here'}",
                            "--set", f"tables.runs={tmp_path / 'runs'}", "--set", f"model.artifact={tiny_artifact}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and "nothing-here" in summary["error"]


def test_image_id_derived_from_uri_when_absent(spark, capsys, tmp_path, catalogue_rows, tiny_artifact):
    path = tmp_path / "catalogue"
    spark.createDataFrame([(r[1],) for r in catalogue_rows], "uri string").write.format("parquet").save(str(path))
    run_tag(capsys, tmp_path, str(path), tiny_artifact)
    ids = {r["image_id"] for r in predictions(spark, tmp_path).collect()}
    assert ids == {image_id_for(r[1]) for r in catalogue_rows}
