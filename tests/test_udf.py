"""The per-worker runner cache behind the tagging UDF (no Spark session needed)."""

import dataclasses
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.model.manifest import read_manifest
from mumic_batch.spark import udf


def spec_for(artifact, sha: str | None = None, threads: int = 2) -> udf.EngineSpec:
    return udf.EngineSpec(
        artifact=str(artifact),
        weights_sha256=sha or read_manifest(artifact).weights_sha256,
        zero_shot=(udf.ZeroShotClass("pool", "a photo of a pool", 0.5),),
        zero_shot_from="self",
        fetch=FetchCfg(allowed_schemes=("file",), threads=threads),
        decode=DecodeCfg(),
        infer=InferCfg(batch_size=4, device="cpu"),
    )


def test_engine_built_once_per_worker_and_reused(tiny_artifact):
    first = udf.get_engine(spec_for(tiny_artifact))
    assert udf.get_engine(spec_for(tiny_artifact)) is first
    other = udf.get_engine(spec_for(tiny_artifact, threads=3))
    assert other is not first
    assert [c.name for c in first.model.classes if c.zero_shot] == ["pool"]


def test_artifact_changed_under_the_run_is_refused(tiny_artifact):
    with pytest.raises(RuntimeError, match="changed during the run"):
        udf.get_engine(spec_for(tiny_artifact, sha="0" * 64))


def test_udf_function_maps_batches_to_rows(tiny_artifact, hostile_images):
    frame = pd.DataFrame({"image_id": ["a", "b"], "uri": [str(hostile_images["jpeg"]), "/nope/missing.jpg"],
                          "source_updated_at": pd.to_datetime([None, None], utc=True)})
    out = list(udf.tag_batches(spec_for(tiny_artifact))(iter([pa.RecordBatch.from_pandas(frame)])))
    assert len(out) == 1 and out[0].column("image_id").to_pylist() == ["a", "b"]
    assert out[0].column("status").to_pylist() == ["ok", "not_found"]
    assert [f.name for f in udf.UDF_OUTPUT.fields] == out[0].schema.names


def test_udf_output_schema_is_the_predictions_contract():
    """UDF_OUTPUT is derived from the runner's Arrow schema; this is the Spark schema tables are written with."""
    from pyspark.sql.types import (ArrayType, DoubleType, FloatType, IntegerType, MapType, StringType,
                                   StructField, StructType, TimestampType)
    assert udf.UDF_OUTPUT == StructType([
        StructField("image_id", StringType(), False), StructField("uri", StringType(), True),
        StructField("source_updated_at", TimestampType(), True), StructField("status", StringType(), False),
        StructField("error", StringType(), True), StructField("probs", MapType(StringType(), FloatType()), True),
        StructField("labels", ArrayType(StringType()), True),
        StructField("zero_shot_probs", MapType(StringType(), FloatType()), True),
        StructField("zero_shot_labels", ArrayType(StringType()), True),
        StructField("embedding", ArrayType(FloatType()), True), StructField("content_sha256", StringType(), True),
        StructField("width", IntegerType(), True), StructField("height", IntegerType(), True),
        StructField("fetch_ms", DoubleType(), True), StructField("decode_ms", DoubleType(), True),
        StructField("infer_ms", DoubleType(), True),
    ])


def test_outside_a_task_the_configured_device_is_used():
    assert udf.task_device("cpu") == "cpu"
    assert udf.task_device("auto") == "auto"


def test_scoring_waits_for_the_load_the_warm_up_started(tiny_artifact):
    spec = spec_for(tiny_artifact, threads=7)
    assert udf.start_engine(spec, "cpu") == "none"
    engine = udf.get_engine(spec, "cpu")
    assert udf.start_engine(spec, "cpu") == "loaded"
    assert udf.get_engine(spec, "cpu") is engine


def test_a_failed_warm_up_load_is_loaded_again_by_the_scoring_task(tiny_artifact, tmp_path):
    artifact = tmp_path / "model"  # not there yet: the background load fails
    spec = dataclasses.replace(spec_for(tiny_artifact, threads=8), artifact=str(artifact))
    udf.start_engine(spec, "cpu")
    udf._ENGINES[(spec, "cpu")].done.wait(timeout=120)
    shutil.copytree(tiny_artifact, artifact)
    engine = udf.get_engine(spec, "cpu")
    assert engine.model.weights_sha256 == spec.weights_sha256


def test_a_failed_load_in_the_task_itself_raises(tiny_artifact, tmp_path):
    spec = dataclasses.replace(spec_for(tiny_artifact, threads=9), artifact=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="artifact directory not found"):
        udf.get_engine(spec, "cpu")


@pytest.mark.spark
def test_warm_up_starts_the_model_loading_in_the_workers_spark_reuses(spark, tiny_artifact):
    spec = spec_for(tiny_artifact, threads=5)  # a spec no other test builds: no worker has it yet
    first = udf.WarmUp(spark, spec, 2).start().wait(timeout=300)
    assert [r["had"] for r in first] == ["none", "none"]
    # The next mapInArrow tasks (as scoring's) get the same idle workers, loading or done loading.
    second = udf.WarmUp(spark, spec, 2).start()
    again = second.wait(timeout=300)
    assert {r["pid"] for r in again} == {r["pid"] for r in first}
    assert {r["had"] for r in again} <= {"loading", "loaded"}
    second.finish()  # waits for the loads of both workers
    assert [r["had"] for r in udf.WarmUp(spark, spec, 2).start().wait(timeout=300)] == ["loaded", "loaded"]


@pytest.mark.spark
def test_a_stopped_warm_up_leaves_the_session_usable(spark, tiny_artifact):
    warm_up = udf.WarmUp(spark, spec_for(tiny_artifact, threads=6), 2).start()
    warm_up.stop()
    warm_up.finish()  # returns once any load the stopped warm-up started has ended
    assert spark.range(3).count() == 3
