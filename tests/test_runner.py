"""The Spark-free inference runner: one output row per input row, in order, with statuses; batches built
across frames; bounded memory; Arrow output equal to the per-row output it replaced."""

import io
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mumic_batch.config import DecodeCfg, FetchCfg, InferCfg
from mumic_batch.core import status as st
from mumic_batch.core.decode import decode_image
from mumic_batch.core.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessSpec, normalise, resize_crop
from mumic_batch.inference.device import resize_crop_tensor, tensor_resizable
from mumic_batch.inference.outputs import OUTPUT_COLUMNS, OUTPUT_SCHEMA
from mumic_batch.inference.prepare import Preparer, image_tensor
from mumic_batch.inference.runner import Runner
from mumic_batch.io.fetch import Fetcher
from mumic_batch.model.predictor import Predictor

FILE_ONLY = FetchCfg(allowed_schemes=("file",))
GOOD = ("jpeg", "png", "webp", "cmyk_jpeg", "palette_png", "exif_rotated_jpeg", "animated_gif", "png16")


def make_runner(model, batch_size=3, prefetch=2, fetcher=None, decode="cpu", workers=2):
    return Runner(model, fetcher or Fetcher(FILE_ONLY), DecodeCfg(),
                  InferCfg(batch_size=batch_size, prefetch_batches=prefetch, device="cpu", decode=decode,
                           decode_workers=workers), fetch_threads=2)


def frame(uris, start=0):
    return pd.DataFrame({"image_id": [f"id{start + i}" for i in range(len(uris))], "uri": uris})


def arrow_frame(uris, start=0):
    return pa.RecordBatch.from_pandas(frame(uris, start), preserve_index=False)


class Recording:
    """A model that delegates to a predictor and records what it was given (a BatchModel)."""

    def __init__(self, predictor, on_batch=None):
        self.inner = predictor
        self.device, self.spec, self.embed_dim, self.classes = (predictor.device, predictor.spec,
                                                                predictor.embed_dim, predictor.classes)
        self.batches: list[int] = []
        self.on_batch = on_batch

    def score_uint8(self, nhwc):
        self.batches.append(int(nhwc.shape[0]))
        if self.on_batch:
            self.on_batch(self)
        return self.inner.score_uint8(nhwc)


class CountingFetcher(Fetcher):
    """Counts fetches; optionally holds one URI until released (a straggler)."""

    def __init__(self, cfg, hold=None):
        super().__init__(cfg)
        self.fetched = 0
        self.hold, self.release = hold, threading.Event()
        self.lock = threading.Lock()
        self.max_ahead = 0
        self.scored = 0

    def fetch(self, uri):
        with self.lock:
            self.fetched += 1
            self.max_ahead = max(self.max_ahead, self.fetched - self.scored)
        if uri == self.hold:
            assert self.release.wait(60), "straggler never released"
        return super().fetch(uri)


def test_stream_of_frames_keeps_order_and_counts(tiny_predictor, hostile_images):
    runner = make_runner(tiny_predictor)
    good = [str(hostile_images[k]) for k in ("jpeg", "png", "webp", "cmyk_jpeg", "palette_png")]
    bad = [str(hostile_images["truncated_jpeg"]), "", str(hostile_images["tiff"])]
    frames = [frame(good[:3] + bad[:1]), frame(good[3:] + bad[1:], start=4), frame([], start=9)]
    out = list(runner.run_pandas(iter(frames)))
    runner.close()
    assert [len(o) for o in out] == [4, 4, 0]
    assert list(out[0].columns) == list(OUTPUT_COLUMNS)
    assert list(out[0]["status"]) == ["ok", "ok", "ok", "truncated"]
    assert list(out[1]["status"]) == ["ok", "ok", "bad_uri", "unsupported_format"]
    assert list(out[1]["image_id"]) == ["id4", "id5", "id6", "id7"]


def test_batched_scores_equal_direct_prediction(tiny_predictor, hostile_images):
    runner = make_runner(tiny_predictor, batch_size=2)
    uris = [str(hostile_images[k]) for k in ("jpeg", "png", "webp")]
    out = next(runner.run_pandas(iter([frame(uris)])))
    runner.close()
    probs, emb = tiny_predictor.predict(np.stack([runner_pixels(runner, u) for u in uris]))
    names = [c.name for c in tiny_predictor.classes]
    for i, row in out.iterrows():
        np.testing.assert_allclose([row["probs"][n] for n in names], probs[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row["embedding"], emb[i], rtol=1e-5, atol=1e-6)
        assert list(row["labels"]) == [c.name for j, c in enumerate(tiny_predictor.classes)
                                       if probs[i, j] >= c.threshold]


def test_batches_fill_across_frames_and_every_row_returns_once_in_order(tiny_predictor, hostile_images):
    model = Recording(tiny_predictor)
    runner = make_runner(model, batch_size=256, prefetch=1)
    files = [str(hostile_images[k]) for k in GOOD] + [str(hostile_images["truncated_jpeg"])]
    uris = [files[i % len(files)] for i in range(64 * 5)]
    frames = [arrow_frame(uris[i:i + 64], start=i) for i in range(0, len(uris), 64)]
    out = list(runner.run(iter(frames)))
    runner.close()
    assert [b.num_rows for b in out] == [64] * 5
    assert pa.Table.from_batches(out).column("image_id").to_pylist() == [f"id{i}" for i in range(len(uris))]
    statuses = pa.Table.from_batches(out).column("status").to_pylist()
    assert statuses == ["truncated" if u.endswith("truncated.jpg") else "ok" for u in uris]
    ok_rows = statuses.count("ok")
    assert model.batches[0] == 256 and sum(model.batches) == ok_rows  # full batches though frames hold 64 rows
    assert all(b == 256 for b in model.batches[:-1])


def test_rows_in_flight_stay_bounded(tiny_predictor, hostile_images):
    fetcher = CountingFetcher(FILE_ONLY)

    def scored(model):
        with fetcher.lock:
            fetcher.scored += model.batches[-1]

    model = Recording(tiny_predictor, on_batch=scored)
    runner = make_runner(model, batch_size=8, prefetch=1, fetcher=fetcher)
    uri = str(hostile_images["png"])
    frames = [arrow_frame([uri] * 4, start=4 * i) for i in range(30)]
    out = list(runner.run(iter(frames)))
    runner.close()
    assert sum(b.num_rows for b in out) == 120
    # batch_size * (prefetch_batches + 1) rows may be fetched ahead of the model, plus the rest of one frame
    assert fetcher.max_ahead <= 8 * 2 + 3


def test_a_straggler_does_not_hold_up_the_model(tiny_predictor, hostile_images):
    slow = str(hostile_images["webp"])
    fetcher = CountingFetcher(FILE_ONLY, hold=slow)

    def release_after_two_batches(model):
        if len(model.batches) == 2:
            fetcher.release.set()

    model = Recording(tiny_predictor, on_batch=release_after_two_batches)
    runner = make_runner(model, batch_size=4, prefetch=2, fetcher=fetcher)
    fast = str(hostile_images["png"])
    frames = [arrow_frame([slow, fast, fast, fast], start=0)] + [arrow_frame([fast] * 4, start=4 * i)
                                                                for i in range(1, 6)]
    out = list(runner.run(iter(frames)))
    runner.close()
    assert fetcher.release.is_set()
    assert model.batches[:2] == [4, 4]  # two full batches of later rows ran while the first row was stuck
    table = pa.Table.from_batches(out)
    assert table.column("image_id").to_pylist() == [f"id{i}" for i in range(24)]
    assert table.column("status").to_pylist() == ["ok"] * 24


def test_arrow_output_equals_the_per_row_output_it_replaced(tiny_artifact, hostile_images):
    extra = [type("Z", (), {"name": "pool", "prompt": "a photo of a pool", "threshold": 0.3})()]
    predictor = Predictor.load(str(tiny_artifact), zero_shot=extra, device="cpu")
    runner = make_runner(predictor, batch_size=4)
    uris = [str(hostile_images[k]) for k in GOOD] + [str(hostile_images["bomb_png"]), ""]
    updated = pd.to_datetime(["2026-01-02T03:04:05Z"] * len(uris))
    batch = pa.RecordBatch.from_pandas(frame(uris).assign(source_updated_at=updated), preserve_index=False)
    out = pa.Table.from_batches(list(runner.run([batch])))
    runner.close()
    assert out.schema.equals(OUTPUT_SCHEMA)
    rows = out.to_pylist()
    for uri, row in zip(uris, rows):
        expected = legacy_row(predictor, runner, uri, row)
        assert same_except_float_noise(row, expected), (uri, row, expected)
    assert rows[-2]["status"] == "decompression_bomb" and rows[-1]["status"] == "bad_uri"
    assert rows[0]["source_updated_at"].isoformat() == "2026-01-02T03:04:05+00:00"


def same_except_float_noise(row, expected):
    """Equal, with probabilities and embeddings within 1e-5 (batch composition changes float summation order)."""
    for key, value in expected.items():
        if key in ("probs", "zero_shot_probs") and value is not None:
            assert [k for k, _ in row[key]] == [k for k, _ in value]
            np.testing.assert_allclose([v for _, v in row[key]], [v for _, v in value], atol=1e-5)
        elif key == "embedding" and value is not None:
            np.testing.assert_allclose(row[key], value, atol=1e-5)
        elif row[key] != value:
            return False
    return set(row) == set(expected)


def runner_pixels(runner, uri):
    """The normalised [3, S, S] input the runner's CPU path makes of one file."""
    hwc = runner.preparer.decode_cpu(open(uri, "rb").read())[0]
    return normalise(hwc, runner.preparer.spec).transpose(2, 0, 1)


def legacy_row(predictor, runner, uri, actual):
    """The row the old per-row builder (dicts, tolist) made, from a direct prediction of the same image."""
    expected = dict(actual, probs=None, labels=None, zero_shot_probs=None, zero_shot_labels=None, embedding=None)
    if actual["status"] != st.OK:
        return dict(expected, width=None, height=None, content_sha256=None)
    decoded = decode_image(open(uri, "rb").read(), DecodeCfg(), predictor.spec.size)
    probs, emb = predictor.predict(runner_pixels(runner, uri)[None])
    p = probs[0]
    trained = [j for j, c in enumerate(predictor.classes) if not c.zero_shot]
    zero = [j for j, c in enumerate(predictor.classes) if c.zero_shot]
    names = [c.name for c in predictor.classes]

    def prob_map(idx):  # Arrow maps come back as (key, value) pairs
        return [(names[j], float(np.float32(p[j]))) for j in idx]

    def labels(idx):
        return [names[j] for j in idx if p[j] >= predictor.classes[j].threshold]

    return dict(expected, probs=prob_map(trained), labels=labels(trained), zero_shot_probs=prob_map(zero),
                zero_shot_labels=labels(zero), embedding=[float(x) for x in emb[0].astype(np.float32)],
                width=decoded.width, height=decoded.height)


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (101, 37), (1000, 999), (224, 224), (5000, 4000)])
def test_torch_resize_matches_pillow(size, interpolation, mode):
    from tests.fixtures.net import make_jpeg

    image = Image.open(io.BytesIO(make_jpeg(800, 600, seed=3))).convert("RGB").resize(size)
    spec = PreprocessSpec(224, OPENAI_MEAN, OPENAI_STD, interpolation=interpolation, resize_mode=mode)
    assert tensor_resizable(spec)
    tensor = image_tensor(image)
    # Pillow's own memory (RGBX) without a copy; an image above its allocation block is copied.
    assert tensor.shape[0] == (3 if size == (5000, 4000) else 4)
    ours = resize_crop_tensor(tensor, spec).numpy().astype(int)
    pillow = resize_crop(image, spec).astype(int)
    assert ours.shape == pillow.shape == (224, 224, 3)
    diff = np.abs(ours - pillow)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_specs_torch_cannot_reproduce_resize_with_pillow(tiny_predictor, hostile_images):
    data = hostile_images["jpeg"].read_bytes()
    for spec in (PreprocessSpec(224, OPENAI_MEAN, OPENAI_STD, interpolation="lanczos"),
                 PreprocessSpec(224, OPENAI_MEAN, OPENAI_STD, resize_mode="longest")):
        assert not tensor_resizable(spec)
        preparer = Preparer(Fetcher(FILE_ONLY), DecodeCfg(), spec, decode_workers=1)
        expected = resize_crop(decode_image(data, DecodeCfg(), 224).image, spec)
        np.testing.assert_array_equal(preparer.decode_cpu(data)[0], expected)


def test_torch_decode_path_matches_pillow_within_tolerance(tiny_predictor, hostile_images, tmp_path):
    from tests.fixtures.net import make_jpeg

    sizes = [(640, 480), (1600, 1200), (480, 640), (300, 300)]
    uris = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"p{i}.jpg"
        path.write_bytes(make_jpeg(w, h, seed=i))
        uris.append(str(path))
    results = {}
    for decode in ("cpu", "gpu"):
        runner = make_runner(tiny_predictor, batch_size=3, decode=decode)
        results[decode] = pa.Table.from_batches(list(runner.run([arrow_frame(uris)]))).to_pylist()
        runner.close()
    for pil, dev in zip(results["cpu"], results["gpu"]):
        assert (dev["status"], dev["width"], dev["height"]) == (pil["status"], pil["width"], pil["height"])
        cos = float(np.dot(pil["embedding"], dev["embedding"]))
        assert cos > 0.995, (pil["uri"], cos)
        np.testing.assert_allclose([v for _, v in dev["probs"]], [v for _, v in pil["probs"]], atol=0.02)


def test_torch_decode_path_gives_the_cpu_statuses_for_hostile_files(tiny_predictor, hostile_images):
    uris = [str(p) for p in hostile_images.values()]
    statuses = {}
    for decode in ("cpu", "gpu"):
        runner = make_runner(tiny_predictor, batch_size=4, decode=decode)
        out = pa.Table.from_batches(list(runner.run([arrow_frame(uris)])))
        runner.close()
        statuses[decode] = out.column("status").to_pylist()
    assert statuses["gpu"] == statuses["cpu"]
    assert "truncated" in statuses["cpu"] and "ok" in statuses["cpu"]


def test_jpegs_take_the_device_decoder_only_when_their_header_allows(tiny_predictor, hostile_images):
    runner = make_runner(tiny_predictor, decode="gpu")
    prep = runner.preparer
    assert prep.prepare(str(hostile_images["jpeg"])).jpeg is not None
    for name in ("cmyk_jpeg", "exif_rotated_jpeg", "truncated_jpeg", "png"):
        assert prep.prepare(str(hostile_images[name])).jpeg is None, name
    runner.close()


def test_device_decoder_refusal_falls_back_to_the_cpu_status(tiny_predictor, tmp_path):
    from tests.fixtures.net import make_jpeg

    good = make_jpeg(320, 240)
    # header and end marker intact (so it is handed to the device decoder), scan data zeroed
    corrupt = good[:600] + bytes(len(good) - 602) + good[-2:]
    uris = []
    for name, data in (("good.jpg", good), ("corrupt.jpg", corrupt)):
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    runner = make_runner(tiny_predictor, decode="gpu")
    assert runner.preparer.prepare(uris[1]).jpeg is not None
    out = pa.Table.from_batches(list(runner.run([arrow_frame(uris)]))).to_pylist()
    runner.close()
    assert [r["status"] for r in out] == ["ok", "decode_error"]
    assert out[1]["error"] and out[1]["embedding"] is None and out[1]["width"] is None


def test_cuda_requested_without_a_gpu_is_a_clear_error(tiny_artifact):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="requested but torch sees no CUDA device"):
        Predictor.load(str(tiny_artifact), device="cuda")


def test_auto_precision_is_fp32_on_cpu(tiny_artifact):
    predictor = Predictor.load(str(tiny_artifact), device="cpu", precision="auto")
    assert predictor.precision == "fp32"


@pytest.mark.gpu
def test_gpu_runner_bf16_matches_cpu(tiny_artifact, hostile_images):
    cpu = Predictor.load(str(tiny_artifact), device="cpu")
    gpu = Predictor.load(str(tiny_artifact), device="cuda", precision="bf16")
    uris = [str(hostile_images[k]) for k in GOOD]
    out = {}
    for name, model, decode in (("cpu", cpu, "cpu"), ("gpu", gpu, "gpu")):
        runner = Runner(model, Fetcher(FILE_ONLY), DecodeCfg(),
                        InferCfg(batch_size=4, device=str(model.device), decode=decode), fetch_threads=2)
        out[name] = pa.Table.from_batches(list(runner.run([arrow_frame(uris)]))).to_pylist()
        runner.close()
    for a, b in zip(out["cpu"], out["gpu"]):
        assert a["status"] == b["status"]
        assert float(np.dot(a["embedding"], b["embedding"])) > 0.98


def test_device_names_are_checked_and_workers_spread_over_gpus():
    from mumic_batch.model.device import resolve_device, spread_index

    assert resolve_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    assert [spread_index(w, 4) for w in range(6)] == [0, 1, 2, 3, 0, 1]
    assert spread_index(5, 0) == 0


def test_a_class_validation_left_unassigned_is_never_a_label(tiny_predictor, hostile_images):
    import dataclasses

    model = Recording(tiny_predictor)
    model.classes = tuple(dataclasses.replace(c, threshold=0.0, assign=(i != 0))
                          for i, c in enumerate(tiny_predictor.classes))
    runner = make_runner(model)
    out = pa.Table.from_batches(list(runner.run([arrow_frame([str(hostile_images["jpeg"])] * 2)]))).to_pylist()
    runner.close()
    names = [c.name for c in tiny_predictor.classes]
    assert [r["labels"] for r in out] == [names[1:]] * 2  # threshold 0 assigns every class except the unassigned
