"""Model artifacts and the Predictor: round trips, manifest, integrity checks, zero-shot classes, S3."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mumic_batch.config import ZeroShotClassCfg
from mumic_batch.model.artifact import CLASS_EMBEDDINGS, load_artifact, load_model, save_artifact
from mumic_batch.model.manifest import FORMAT_VERSION, ArtifactError, ClassEntry, check_artifact, read_manifest
from mumic_batch.model.backbone import TINY_ARCH, skip_init
from mumic_batch.model.mumic import build_mumic
from mumic_batch.model.predictor import Predictor, merge_classes
from tests.fixtures.models import (
    TINY_BIAS,
    TINY_CLASSES,
    TINY_NAME,
    TINY_SEED,
    TINY_VERSION,
    copy_artifact,
    random_pixels,
    write_tiny_artifact,
)


def rewrite_manifest(artifact: Path, **changes: object) -> None:
    """Edit fields of an artifact's manifest.json in place."""
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- round trip and manifest -----------------------------------------------------------------


def test_round_trip_gives_identical_predictions(tiny_artifact: Path, tmp_path: Path) -> None:
    original = build_mumic(TINY_ARCH, init_bias=TINY_BIAS, seed=TINY_SEED).eval()
    loaded, manifest = load_artifact(str(tiny_artifact))
    pixels = torch.from_numpy(random_pixels(6))
    prompts = [c.prompt for c in manifest.classes]
    with torch.inference_mode():
        expected, expected_emb = original(pixels, original.encode_prompts(prompts))
        got, got_emb = loaded(pixels, loaded.encode_prompts(prompts))
    assert torch.equal(got, expected) and torch.equal(got_emb, expected_emb)
    again = save_artifact(tmp_path / "again", loaded, name=TINY_NAME, version="v2", classes=manifest.classes)
    assert again.weights_sha256 == manifest.weights_sha256  # safetensors output is deterministic


def test_skip_init_only_lasts_for_its_block_even_when_it_raises() -> None:
    weights = torch.zeros(4)
    with pytest.raises(RuntimeError), skip_init():
        torch.nn.init.normal_(weights)
        assert torch.equal(weights, torch.zeros(4))  # the loader overwrites every parameter next
        raise RuntimeError("a failed build")
    torch.nn.init.normal_(weights)
    assert not torch.equal(weights, torch.zeros(4))


def test_manifest_records_everything_needed_to_rebuild_and_trace(tiny_artifact: Path) -> None:
    manifest = read_manifest(tiny_artifact)
    on_disk = json.loads((tiny_artifact / "manifest.json").read_text())
    weights = (tiny_artifact / manifest.weights_file).read_bytes()
    assert sorted(p.name for p in tiny_artifact.iterdir()) == ["manifest.json", "weights.safetensors"]
    assert on_disk["format_version"] == FORMAT_VERSION == manifest.format_version
    assert (manifest.name, manifest.version) == (TINY_NAME, TINY_VERSION)
    assert manifest.architecture == TINY_ARCH and manifest.embed_dim == 64
    assert manifest.classes == TINY_CLASSES
    assert on_disk["classes"][2] == {
        "name": "digit_3", "prompt": "a photo of the handwritten digit 3", "threshold": 0.6, "zero_shot": False
    }
    assert manifest.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert manifest.weights_size == len(weights)
    assert manifest.preprocess["size"] == 64 and manifest.preprocess_spec.size == 64
    assert manifest.preprocess_spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert manifest.log_scale == pytest.approx(np.log(1 / 0.07)) and manifest.bias == TINY_BIAS
    assert manifest.training_data == {"kind": "untrained", "seed": TINY_SEED}
    assert manifest.created_at.endswith("+00:00")


def test_save_refuses_to_replace_an_artifact_unless_asked(tiny_artifact: Path, tmp_path: Path) -> None:
    target = copy_artifact(tiny_artifact, tmp_path / "model")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_tiny_artifact(target)
    model = build_mumic(TINY_ARCH, seed=5)
    manifest = save_artifact(target, model, name="m", version="v9", classes=TINY_CLASSES[:2], overwrite=True)
    assert read_manifest(target) == manifest and manifest.bias is None
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or stale directories left behind


def test_duplicate_class_names_cannot_be_saved(tmp_path: Path) -> None:
    classes = [ClassEntry("red", "a photo of something red"), ClassEntry("red", "red things")]
    with pytest.raises(ValueError, match="duplicate class names"):
        save_artifact(tmp_path / "m", build_mumic(TINY_ARCH, seed=0), name="m", version="1", classes=classes)
    assert not (tmp_path / "m").exists()


# --- integrity -------------------------------------------------------------------------------


def test_flipped_byte_in_weights_is_refused_naming_file_and_both_hashes(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_artifact(tiny_artifact, tmp_path / "tampered")
    weights = artifact / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    expected = read_manifest(artifact).weights_sha256
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(ArtifactError) as err:
        load_artifact(str(artifact))
    message = str(err.value)
    assert "sha256 mismatch" in message and str(weights) in message
    assert expected in message and actual in message
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        Predictor.load(str(artifact), device="cpu")


def test_missing_files_give_clear_errors(tiny_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="artifact directory not found"):
        load_artifact(str(tmp_path / "nowhere"))
    no_weights = copy_artifact(tiny_artifact, tmp_path / "no_weights")
    (no_weights / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="weights file missing"):
        load_artifact(str(no_weights))
    no_manifest = copy_artifact(tiny_artifact, tmp_path / "no_manifest")
    (no_manifest / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_artifact(f"file://{no_manifest}")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 99}, "unsupported artifact format_version 99"),
        ({"weights_file": "../tiny/weights.safetensors"}, "plain file name"),
        ({"weights_size": 12}, "manifest says 12"),
        ({"bias": 3.0}, "manifest bias=3.0 disagrees"),
        ({"log_scale": 1.0}, "manifest log_scale=1.0 disagrees"),
        ({"surprise": 1}, "unknown fields \\['surprise'\\]"),
        ({"architecture": dict(TINY_ARCH, embed_dim=32)}, "does not match the model"),
    ],
)
def test_inconsistent_manifests_are_refused(
    tiny_artifact: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    artifact = copy_artifact(tiny_artifact, tmp_path / "edited")
    rewrite_manifest(artifact, **changes)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(str(artifact))


# --- predictor -------------------------------------------------------------------------------


def test_predictor_outputs_probabilities_and_unit_embeddings(tiny_predictor: Predictor) -> None:
    probs, emb = tiny_predictor.predict(random_pixels(7))
    assert probs.shape == (7, len(TINY_CLASSES)) and emb.shape == (7, 64)
    assert probs.dtype == np.float32 and emb.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert probs.std() > 0, "different images and classes should not all score the same"
    assert tiny_predictor.spec.size == 64 and tiny_predictor.class_names[0] == "red"
    assert (tiny_predictor.model_name, tiny_predictor.model_version) == (TINY_NAME, TINY_VERSION)
    assert tiny_predictor.weights_sha256 == tiny_predictor.manifest.weights_sha256
    np.testing.assert_allclose(tiny_predictor.thresholds, [0.5, 0.5, 0.6, 0.6, 0.4], rtol=1e-6)


def test_predictor_matches_the_model_and_is_batch_independent(tiny_predictor: Predictor) -> None:
    pixels = random_pixels(5, seed=3)
    probs, emb = tiny_predictor.predict(pixels)
    model = tiny_predictor.model
    with torch.inference_mode():
        class_emb = model.encode_prompts([c.prompt for c in TINY_CLASSES])
        logits, expected_emb = model(torch.from_numpy(pixels), class_emb)
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(emb, expected_emb.numpy(), rtol=1e-6, atol=1e-6)
    one_probs, _ = tiny_predictor.predict(pixels[2:3])
    np.testing.assert_allclose(one_probs[0], probs[2], rtol=1e-5, atol=1e-6)
    tensor_probs, _ = tiny_predictor.predict(torch.from_numpy(pixels))
    np.testing.assert_array_equal(tensor_probs, probs)


def rewrite_weights(artifact: Path, edit) -> Path:
    """Apply `edit` to an artifact's tensors in place and update the manifest's sha256 and size to match."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(artifact / "weights.safetensors"))
    edit(tensors)
    save_file(tensors, str(artifact / "weights.safetensors"), metadata={"format": "pt"})
    data = (artifact / "weights.safetensors").read_bytes()
    rewrite_manifest(artifact, weights_sha256=hashlib.sha256(data).hexdigest(), weights_size=len(data))
    return artifact


def without_stored_embeddings(artifact: Path, out: Path) -> Path:
    """A copy of `artifact` as written before prompt embeddings were stored (weights and manifest hash)."""
    return rewrite_weights(copy_artifact(artifact, out), lambda tensors: tensors.pop(CLASS_EMBEDDINGS))


def test_artifact_stores_the_classes_prompt_embeddings(tiny_artifact: Path) -> None:
    loaded = load_model(str(tiny_artifact))
    with torch.inference_mode():
        computed = loaded.model.encode_prompts([c.prompt for c in loaded.manifest.classes])
    assert loaded.class_embeddings.shape == (len(TINY_CLASSES), 64)
    torch.testing.assert_close(loaded.class_embeddings, computed.float(), rtol=1e-6, atol=1e-6)


def test_predictor_from_stored_embeddings_scores_as_one_that_embeds_the_prompts(
        tiny_artifact: Path, tmp_path: Path) -> None:
    extras = [ZeroShotClassCfg(name="pool", prompt="a photo of a swimming pool", threshold=0.9)]
    stored = Predictor.load(str(tiny_artifact), zero_shot=extras)
    older = Predictor.load(str(without_stored_embeddings(tiny_artifact, tmp_path / "older")), zero_shot=extras)
    assert stored.stored is not None and older.stored is None
    pixels = random_pixels(6, seed=5)
    np.testing.assert_allclose(stored.predict(pixels)[0], older.predict(pixels)[0], rtol=1e-5, atol=1e-6)
    assert stored.class_names == older.class_names and stored.class_names[-1] == "pool"


def test_stored_embeddings_that_do_not_match_the_classes_are_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    def truncate(tensors: dict) -> None:
        tensors[CLASS_EMBEDDINGS] = tensors[CLASS_EMBEDDINGS][:2].contiguous()

    bad = rewrite_weights(copy_artifact(tiny_artifact, tmp_path / "bad"), truncate)
    with pytest.raises(ArtifactError, match=r"class_embeddings are torch.float32 \(2, 64\), expected finite float32 \(5, 64\)"):
        load_artifact(str(bad))


def test_predictor_rejects_wrong_shapes_and_handles_empty_batches(tiny_predictor: Predictor) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        tiny_predictor.predict(random_pixels(2, size=32))
    probs, emb = tiny_predictor.predict(np.zeros((0, 3, 64, 64), np.float32))
    assert probs.shape == (0, 5) and emb.shape == (0, 64)


def test_zero_shot_classes_are_appended_and_marked(tiny_artifact: Path, tiny_predictor: Predictor) -> None:
    extras = [
        ClassEntry("green", "a photo of something green", threshold=0.7),
        ZeroShotClassCfg(name="pool", prompt="a photo of a swimming pool", threshold=0.9),
    ]
    predictor = Predictor.load(str(tiny_artifact), zero_shot=extras, device="cpu")
    assert predictor.class_names == tuple(c.name for c in TINY_CLASSES) + ("green", "pool")
    assert [c.zero_shot for c in predictor.classes] == [False] * 5 + [True, True]
    assert predictor.classes[-1] == ClassEntry("pool", "a photo of a swimming pool", 0.9, zero_shot=True)
    pixels = random_pixels(4, seed=9)
    probs, emb = predictor.predict(pixels)
    base_probs, base_emb = tiny_predictor.predict(pixels)
    assert probs.shape == (4, 7)
    np.testing.assert_allclose(probs[:, :5], base_probs, rtol=1e-6, atol=1e-6)  # extras change nothing else
    np.testing.assert_allclose(emb, base_emb, rtol=1e-6, atol=1e-6)
    swapped = predictor.with_zero_shot([ClassEntry("beach", "a photo of a beach")])
    assert swapped.class_names[-1] == "beach" and len(swapped.classes) == 6


def test_zero_shot_name_clashing_with_a_trained_class_is_refused(tiny_artifact: Path) -> None:
    with pytest.raises(ValueError, match=r"duplicate class names .*\['red'\]"):
        Predictor.load(str(tiny_artifact), zero_shot=[ClassEntry("red", "crimson")], device="cpu")


def test_predictor_validates_device_and_precision(tiny_artifact: Path) -> None:
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        Predictor.load(str(tiny_artifact), device="cpu", precision="fp8")
    auto = Predictor.load(str(tiny_artifact), device="auto", precision="bf16")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert auto.predict(random_pixels(2))[0].dtype == np.float32


# --- S3 --------------------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> object:
    """An in-process moto S3 with one bucket; yields a boto3 client."""
    moto = pytest.importorskip("moto")
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="models")
        yield client


def upload_dir(client: object, local: Path, bucket: str, prefix: str) -> None:
    """Upload every file of a directory under an s3 prefix."""
    for path in local.iterdir():
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")  # type: ignore[attr-defined]


def test_artifact_loads_from_s3_through_a_verified_cache(
    tiny_artifact: Path, tmp_path: Path, s3_bucket: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUMIC_CACHE_DIR", str(tmp_path / "cache"))
    upload_dir(s3_bucket, tiny_artifact, "models", "tagger/v1")
    from_s3 = Predictor.load("s3://models/tagger/v1", device="cpu")
    local = Predictor.load(str(tiny_artifact), device="cpu")
    pixels = random_pixels(3)
    np.testing.assert_array_equal(from_s3.predict(pixels)[0], local.predict(pixels)[0])
    cached = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in cached.iterdir()) == [".s3-listing.json", "manifest.json", "weights.safetensors"]
    first_mtime = os.stat(cached / "weights.safetensors").st_mtime_ns
    load_artifact("s3://models/tagger/v1")
    assert os.stat(cached / "weights.safetensors").st_mtime_ns == first_mtime  # unchanged listing: no re-download
    tampered = bytearray((tiny_artifact / "weights.safetensors").read_bytes())
    tampered[-1] ^= 0xFF
    s3_bucket.put_object(Bucket="models", Key="tagger/v1/weights.safetensors", Body=bytes(tampered))  # type: ignore[attr-defined]
    with pytest.raises(ArtifactError, match="sha256 mismatch"):  # the changed object is fetched, then refused
        load_artifact("s3://models/tagger/v1")


def test_empty_s3_prefix_is_an_error(s3_bucket: object, tmp_path: Path) -> None:
    from mumic_batch.io.storage import StorageError

    with pytest.raises(StorageError, match="no objects under s3://models/absent/"):
        load_artifact("s3://models/absent", cache_dir=str(tmp_path))


def test_s3_keys_that_escape_the_cache_are_refused(s3_bucket: object, tmp_path: Path) -> None:
    from mumic_batch.io.storage import StorageError

    s3_bucket.put_object(Bucket="models", Key="evil/../../outside.txt", Body=b"x")  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match="unsafe object key"):
        load_artifact("s3://models/evil", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "outside.txt").exists()


def test_clip_weights_can_come_from_s3(s3_bucket: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("MUMIC_CACHE_DIR", str(tmp_path / "cache"))
    source = build_mumic(TINY_ARCH, seed=3).backbone
    save_file(dict(source.state_dict()), str(tmp_path / "clip.safetensors"))
    s3_bucket.upload_file(str(tmp_path / "clip.safetensors"), "models", "clip/tiny/clip.safetensors")  # type: ignore[attr-defined]
    model = build_mumic(TINY_ARCH, clip_weights="s3://models/clip/tiny/clip.safetensors", seed=4)
    assert torch.equal(model.backbone.visual.proj, source.visual.proj)
    assert model.log_scale.item() == source.logit_scale.item()


def test_driver_check_streams_the_weights_from_s3_and_keeps_no_copy(
    tiny_artifact: Path, tmp_path: Path, s3_bucket: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUMIC_CACHE_DIR", str(tmp_path / "cache"))
    upload_dir(s3_bucket, tiny_artifact, "models", "tagger/v2")
    assert check_artifact("s3://models/tagger/v2") == read_manifest(tiny_artifact) == check_artifact(tiny_artifact)
    assert not (tmp_path / "cache").exists()
    tampered = bytearray((tiny_artifact / "weights.safetensors").read_bytes())
    tampered[-1] ^= 0xFF
    s3_bucket.put_object(Bucket="models", Key="tagger/v2/weights.safetensors", Body=bytes(tampered))  # type: ignore[attr-defined]
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        check_artifact("s3://models/tagger/v2")
    s3_bucket.put_object(Bucket="models", Key="tagger/v2/weights.safetensors", Body=b"short")  # type: ignore[attr-defined]
    with pytest.raises(ArtifactError, match="has 5 bytes"):
        check_artifact("s3://models/tagger/v2")
    with pytest.raises(ArtifactError, match="not a model artifact"):
        check_artifact("s3://models/absent")


def test_zero_shot_class_takes_the_training_runs_validation_entry_for_the_same_prompt(tiny_artifact: Path) -> None:
    manifest = read_manifest(tiny_artifact)
    stored = {"name": "pool", "prompt": "a photo of a swimming pool", "threshold": 0.31, "zero_shot": True,
              "assign": False, "note": "cannot reach precision 0.8", "auc": 0.47, "support": 12}
    manifest = dataclasses.replace(manifest, metrics={"zero_shot": {"pool": stored}})
    classes = merge_classes(manifest, [ClassEntry("pool", "a photo of a swimming pool", 0.9),
                                       ClassEntry("beach", "a photo of a beach", 0.6)])
    pool, beach = classes[-2:]
    assert (pool.threshold, pool.assign, pool.auc, pool.zero_shot) == (0.31, False, 0.47, True)
    assert pool.effective_threshold == float("inf")  # never assigned, whatever its probability
    assert beach == ClassEntry("beach", "a photo of a beach", 0.6, zero_shot=True)  # nothing stored for it
    reworded = merge_classes(manifest, [ClassEntry("pool", "an outdoor pool", 0.9)])[-1]
    assert (reworded.threshold, reworded.assign, reworded.auc) == (0.9, True, None)  # another prompt: not its entry
