"""The nightly job over good images mixed with hostile rows from files, HTTP and S3 on loopback."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from jobs import tag_images
from mumic_batch.config import SampleCfg
from mumic_batch.core import status as st
from mumic_batch.core.ids import image_id_for
from mumic_batch.core.sample import generate_sample
from mumic_batch.pipeline.sample import CATALOGUE

pytestmark = pytest.mark.spark

STAMP = datetime(2024, 2, 1, tzinfo=timezone.utc)

FILE_EXPECTED = {
    "jpeg": st.OK, "png": st.OK, "webp": st.OK, "cmyk_jpeg": st.OK, "palette_png": st.OK, "la_png": st.OK,
    "rgba_png": st.OK, "png16": st.OK, "bilevel_bmp": st.OK, "animated_gif": st.OK, "exif_rotated_jpeg": st.OK,
    "truncated_jpeg": st.TRUNCATED, "truncated_png": st.TRUNCATED, "zero_byte": st.EMPTY,
    "bomb_png": st.DECOMPRESSION_BOMB, "large_png": st.DECOMPRESSION_BOMB, "text_bomb_png": st.DECOMPRESSION_BOMB,
    "random_bytes": st.DECODE_ERROR, "html_as_jpg": st.DECODE_ERROR, "tiff": st.UNSUPPORTED_FORMAT,
}

HTTP_EXPECTED = {
    "/image.jpg": st.OK,
    "/flaky/nightly?fail=1&code=500": st.OK,  # retried within the run
    "/status/404": "http_404",
    "/status/503": "http_503",
    "/slow?delay=5": st.TIMEOUT,
    "/big?size=3000000": st.TOO_LARGE,
    "/endless-chunked": st.TOO_LARGE,
    "/html-as-jpeg": st.DECODE_ERROR,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, hostile_images, http_server, canary, s3_server, spark):
    """The catalogue rows (uri -> expected status) and the fetch overrides that go with them."""
    root = tmp_path_factory.mktemp("hostile_job")
    sample = generate_sample(SampleCfg(out_dir=str(root / "sample"), n_images=18, seed=5))
    good = list(sample.catalogue["uri"])
    expected = {uri: st.OK for uri in good[:8]}
    expected.update({str(hostile_images[name]): want for name, want in FILE_EXPECTED.items()})
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    outside.write_bytes(Path(good[0]).read_bytes())
    expected[str(outside)] = st.BLOCKED_PATH
    expected[str(root / "sample" / "images" / "gone.jpg")] = st.NOT_FOUND
    expected.update({http_server.url(path): want for path, want in HTTP_EXPECTED.items()})
    expected[http_server.url(f"/redirect?to={canary.url('/metadata')}")] = st.BLOCKED_DESTINATION
    expected["gopher://127.0.0.1/x"] = st.BLOCKED_SCHEME
    expected[s3_server.put("images/good.jpg", Path(good[1]).read_bytes())] = st.OK
    expected[f"s3://{s3_server.bucket}/images/missing.jpg"] = st.NOT_FOUND
    expected["s3://someone-elses-bucket/x.jpg"] = st.BLOCKED_BUCKET
    fetch = [
        f"fetch.local_roots=[{root / 'sample' / 'images'}, {hostile_images['jpeg'].parent}]",
        "fetch.allowed_schemes=[file, s3, http]",
        "fetch.allowed_networks=[127.0.0.1/32]",
        f"fetch.allowed_buckets=[{s3_server.bucket}]",
        f"fetch.s3_endpoint_url={s3_server.endpoint_url}",
        f"fetch.s3_region={s3_server.region}",
        "fetch.max_bytes=2000000", "fetch.connect_timeout_s=1", "fetch.read_timeout_s=1", "fetch.deadline_s=3",
        "fetch.max_attempts=2", "fetch.backoff_s=0.05",
    ]
    return {"root": root, "expected": expected, "fetch": fetch, "spare": good[8:]}


def run(capsys, world, tables: Path, catalogue: Path, artifact: Path, *extra: str) -> dict:
    sets = [f"tables.catalogue={catalogue}", f"tables.predictions={tables / 'predictions'}",
            f"tables.runs={tables / 'runs'}", f"model.artifact={artifact}", *world["fetch"],
            # A catalogue of hostile files and URLs fails most rows on purpose: no failure thresholds.
            *[f"tag.max_error_rate.{c}=1.0" for c in ("permanent", "transient", "policy")], *extra]
    code = tag_images.main([a for s in sets for a in ("--set", s)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    return summary


def write(spark, uris: list[str], path: Path, mode: str = "overwrite") -> None:
    rows = [(image_id_for(u), u, STAMP) for u in uris]
    spark.createDataFrame(rows, CATALOGUE).write.format("delta").mode(mode).save(str(path))


def statuses(spark, tables: Path) -> dict[str, tuple[str, int]]:
    rows = spark.read.format("delta").load(str(tables / "predictions")).collect()
    return {r["uri"]: (r["status"], r["attempts"]) for r in rows}


def test_nightly_over_hostile_catalogue(spark, capsys, tmp_path, world, tiny_artifact, canary):
    catalogue = tmp_path / "catalogue"
    expected = world["expected"]
    write(spark, list(expected), catalogue)

    canary_before = canary.connections  # session-scoped: other tests connect to it on purpose
    first = run(capsys, world, tmp_path, catalogue, tiny_artifact)
    got = statuses(spark, tmp_path)
    assert {uri: s for uri, (s, _) in got.items()} == expected  # one row per input, each with its status
    assert first["processed"] == len(expected)
    assert canary.connections == canary_before  # the redirect to 127.0.0.2 was refused before connecting
    ok_rows = spark.read.format("delta").load(str(tmp_path / "predictions")).where("status = 'ok'").collect()
    assert all(r["embedding"] and r["probs"] and r["width"] > 0 for r in ok_rows)
    errors = spark.read.format("delta").load(str(tmp_path / "predictions")).where("status <> 'ok'").collect()
    assert all(r["error"] and r["embedding"] is None for r in errors)

    # The same night again: nothing is new, nothing is due for a retry, nothing is written.
    second = run(capsys, world, tmp_path, catalogue, tiny_artifact)
    assert second["processed"] == 0
    assert statuses(spark, tmp_path) == got
    last_run = spark.read.format("delta").load(str(tmp_path / "runs")).orderBy("started_at").collect()[-1]
    assert last_run["processed"] == 0 and last_run["outcome"] == "succeeded"

    # A later night: transient failures (timeout, 503) are retried, permanent ones are not.
    third = run(capsys, world, tmp_path, catalogue, tiny_artifact, "tag.retry_after_s=0")
    transient = {u for u, s in expected.items() if st.is_transient(s)}
    assert transient and third["processed"] == len(transient)
    after = statuses(spark, tmp_path)
    assert {u for u, (s, n) in after.items() if n == 2} == transient

    # Ten new images arrive: exactly those ten are processed.
    new = world["spare"][:10]
    write(spark, new, catalogue, mode="append")
    fourth = run(capsys, world, tmp_path, catalogue, tiny_artifact)
    assert fourth["processed"] == 10
    final = statuses(spark, tmp_path)
    assert len(final) == len(expected) + 10 and all(final[u][0] == st.OK for u in new)


def test_zero_shot_classes_scored_in_the_same_pass(spark, capsys, tmp_path, world, tiny_artifact):
    catalogue = tmp_path / "catalogue"
    good = [u for u, s in world["expected"].items() if s == st.OK and u.endswith(".jpg")][:4]
    write(spark, good, catalogue)
    run(capsys, world, tmp_path, catalogue, tiny_artifact,
        "model.zero_shot=[{name: rooftop_terrace, prompt: a photo of a rooftop terrace, threshold: 0.0}]")
    rows = spark.read.format("delta").load(str(tmp_path / "predictions")).collect()
    assert len(rows) == len(good)
    for row in rows:
        assert list(row["zero_shot_probs"]) == ["rooftop_terrace"]
        assert row["zero_shot_labels"] == ["rooftop_terrace"]  # threshold 0: always assigned
        assert "rooftop_terrace" not in row["probs"]
