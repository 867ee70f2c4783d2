"""The per-worker engine cache behind the tagging UDF (no Spark session needed)."""

import pandas as pd
import pytest

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.model.artifact import read_manifest
from mumic_batch.spark import udf


def spec_for(artifact, sha: str | None = None, threads: int = 2) -> udf.EngineSpec:
    return udf.EngineSpec(
        artifact=str(artifact),
        weights_sha256=sha or read_manifest(artifact).weights_sha256,
        zero_shot=(udf.ZeroShotClass("pool", "a photo of a pool", 0.5),),
        fetch=FetchCfg(allowed_schemes=("file",), threads=threads),
        decode=DecodeCfg(),
        infer=InferCfg(batch_size=4, device="cpu"),
    )


def test_engine_built_once_per_worker_and_reused(tiny_artifact):
    first = udf.get_engine(spec_for(tiny_artifact))
    assert udf.get_engine(spec_for(tiny_artifact)) is first
    other = udf.get_engine(spec_for(tiny_artifact, threads=3))
    assert other is not first
    assert [c.name for c in first.predictor.classes if c.zero_shot] == ["pool"]


def test_artifact_changed_under_the_run_is_refused(tiny_artifact):
    with pytest.raises(RuntimeError, match="changed during the run"):
        udf.get_engine(spec_for(tiny_artifact, sha="0" * 64))


def test_udf_function_maps_frames_to_rows(tiny_artifact, hostile_images):
    frames = [pd.DataFrame({"image_id": ["a", "b"], "uri": [str(hostile_images["jpeg"]), "/nope/missing.jpg"],
                            "source_updated_at": [pd.NaT, pd.NaT]})]
    out = list(udf.tag_frames(spec_for(tiny_artifact))(iter(frames)))
    assert len(out) == 1 and list(out[0]["image_id"]) == ["a", "b"]
    assert list(out[0]["status"]) == ["ok", "not_found"]
    assert [f.name for f in udf.UDF_OUTPUT.fields] == list(out[0].columns)


def test_outside_a_task_the_configured_device_is_used():
    assert udf.task_device("cpu") == "cpu"
    assert udf.task_device("auto") == "auto"
