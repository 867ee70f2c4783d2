"""The Spark-free inference engine: one output row per input row, in order, with statuses."""

import numpy as np
import pandas as pd

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.core.decode import decode_image
from mumic_batch.core.preprocess import preprocess
from mumic_batch.io.fetch import Fetcher
from mumic_batch.model.engine import OUTPUT_COLUMNS, InferenceEngine
from mumic_batch.model.predictor import Predictor


def make_engine(artifact, batch_size=3):
    predictor = Predictor.load(str(artifact), device="cpu")
    return InferenceEngine(predictor, Fetcher(FetchCfg(allowed_schemes=("file",))), DecodeCfg(),
                           InferCfg(batch_size=batch_size, device="cpu"), threads=2)


def frame(uris, start=0):
    return pd.DataFrame({"image_id": [f"id{start + i}" for i in range(len(uris))], "uri": uris})


def test_stream_of_frames_keeps_order_and_counts(tiny_artifact, hostile_images):
    engine = make_engine(tiny_artifact)
    good = [str(hostile_images[k]) for k in ("jpeg", "png", "webp", "cmyk_jpeg", "palette_png")]
    bad = [str(hostile_images["truncated_jpeg"]), "", str(hostile_images["tiff"])]
    frames = [frame(good[:3] + bad[:1]), frame(good[3:] + bad[1:], start=4), frame([], start=9)]
    out = list(engine.run(iter(frames)))
    engine.close()
    assert [len(o) for o in out] == [4, 4, 0]
    assert list(out[0].columns) == list(OUTPUT_COLUMNS)
    assert list(out[0]["status"]) == ["ok", "ok", "ok", "truncated"]
    assert list(out[1]["status"]) == ["ok", "ok", "bad_uri", "unsupported_format"]
    assert list(out[1]["image_id"]) == ["id4", "id5", "id6", "id7"]


def test_batched_scores_equal_direct_prediction(tiny_artifact, hostile_images):
    engine = make_engine(tiny_artifact, batch_size=2)
    uris = [str(hostile_images[k]) for k in ("jpeg", "png", "webp")]
    out = next(engine.run(iter([frame(uris)])))
    engine.close()
    predictor = engine.predictor
    pixels = np.stack([preprocess(decode_image(open(u, "rb").read(), DecodeCfg(), predictor.spec.size).image,
                                  predictor.spec) for u in uris])
    probs, emb = predictor.predict(pixels)
    names = [c.name for c in predictor.classes]
    for i, row in out.iterrows():
        np.testing.assert_allclose([row["probs"][n] for n in names], probs[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row["embedding"], emb[i], rtol=1e-5, atol=1e-6)
        assert row["labels"] == [c.name for j, c in enumerate(predictor.classes) if probs[i, j] >= c.threshold]
