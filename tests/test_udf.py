"""The per-worker runner cache behind the tagging UDF (no Spark session needed)."""

import pandas as pd
import pyarrow as pa
import pytest

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.model.artifact import read_manifest
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


@pytest.mark.spark
def test_warm_up_leaves_the_model_loaded_in_the_workers_spark_reuses(spark, tiny_artifact):
    spec = spec_for(tiny_artifact, threads=5)  # a spec no other test builds: no worker has it yet
    first = udf.WarmUp(spark, spec, 2).start().wait(timeout=300)
    assert len(first) == 2 and not any(r["cached"] for r in first)
    # The next mapInArrow tasks (as scoring's) get the same idle workers, with the runner already built.
    again = udf.WarmUp(spark, spec, 2).start().wait(timeout=300)
    assert {r["pid"] for r in again} == {r["pid"] for r in first}
    assert all(r["cached"] for r in again)


@pytest.mark.spark
def test_a_stopped_warm_up_leaves_the_session_usable(spark, tiny_artifact):
    warm_up = udf.WarmUp(spark, spec_for(tiny_artifact, threads=6), 2).start()
    warm_up.stop()
    assert spark.range(3).count() == 3
