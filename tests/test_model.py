"""MuMIC model and backbone: shapes, tempered-sigmoid semantics, prompts, safe checkpoint loading."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mumic_batch.model.backbone import (
    TINY_ARCH,
    WeightsError,
    build_backbone,
    load_clip_weights,
    preprocess_spec,
)
from mumic_batch.model.mumic import MuMIC, build_mumic

PROMPTS = ["a photo of something red", "a photo of the handwritten digit 3", "a photo of two objects"]


@pytest.fixture(scope="module")
def tiny_model() -> MuMIC:
    """A seeded, untrained tiny MuMIC model in eval mode."""
    return build_mumic(TINY_ARCH, init_bias=-1.0, seed=0).eval()


def unit_rows(rows: list[list[float]]) -> torch.Tensor:
    """L2-normalised rows as a float32 tensor."""
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


class Payload:
    """Unpickling this creates the file at `path`: the stand-in for malicious code in a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


# --- shapes and semantics --------------------------------------------------------------------


def test_encoders_return_unit_norm_embeddings_of_the_right_shape(tiny_model: MuMIC) -> None:
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        image_emb = tiny_model.encode_images(pixels)
        class_emb = tiny_model.encode_prompts(PROMPTS)
    assert image_emb.shape == (5, 64) and class_emb.shape == (3, 64)
    assert image_emb.dtype == torch.float32 and class_emb.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(class_emb.norm(dim=1), torch.ones(3))
    assert tiny_model.embed_dim == 64


def test_forward_returns_logits_whose_sigmoid_is_a_probability(tiny_model: MuMIC) -> None:
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        class_emb = tiny_model.encode_prompts(PROMPTS)
        logits, image_emb = tiny_model(pixels, class_emb)
        expected = tiny_model.log_scale.exp() * image_emb @ class_emb.T + tiny_model.bias
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, expected)
    probs = torch.sigmoid(logits)
    assert bool(((probs >= 0) & (probs <= 1)).all())


def test_log_scale_starts_at_clips_logit_scale_and_bias_is_optional() -> None:
    with_bias = build_mumic(TINY_ARCH, init_bias=-10.0, seed=0)
    without = build_mumic(TINY_ARCH, seed=0)
    assert math.isclose(with_bias.log_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert with_bias.log_scale.item() == with_bias.backbone.logit_scale.item()
    assert with_bias.bias is not None and with_bias.bias.item() == -10.0
    assert without.bias is None
    assert "bias" not in without.state_dict() and "bias" in with_bias.state_dict()


def test_larger_log_scale_makes_probabilities_sharper_for_the_same_cosines() -> None:
    model = build_mumic(TINY_ARCH, seed=0)  # no bias: P = 0.5 exactly where the cosine is 0
    image_emb = unit_rows([[1.0, 0.2, 0.3], [0.3, 1.0, -0.5]])
    class_emb = unit_rows([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.1]])
    cos = image_emb @ class_emb.T
    assert bool((cos.abs() > 1e-3).all()), "cosines must be non-zero for this test to mean anything"
    with torch.no_grad():
        model.log_scale.fill_(math.log(2.0))
        soft = torch.sigmoid(model.logits(image_emb, class_emb))
        model.log_scale.fill_(math.log(8.0))
        sharp = torch.sigmoid(model.logits(image_emb, class_emb))
    assert torch.equal(torch.sign(soft - 0.5), torch.sign(cos))  # same decision, only more confident
    assert bool(((sharp - 0.5).abs() > (soft - 0.5).abs()).all())
    torch.testing.assert_close(torch.logit(sharp.double()), 8.0 * cos.double(), rtol=1e-4, atol=1e-4)


def test_bias_shifts_every_logit_by_the_same_amount(tiny_model: MuMIC) -> None:
    image_emb = unit_rows([[1.0, 0.0], [0.6, 0.8]])
    class_emb = unit_rows([[0.0, 1.0], [1.0, 1.0]])
    model = build_mumic(TINY_ARCH, init_bias=0.0, seed=0)
    with torch.no_grad():
        base = model.logits(image_emb, class_emb)
        model.bias.fill_(2.5)
        shifted = model.logits(image_emb, class_emb)
    torch.testing.assert_close(shifted - base, torch.full_like(base, 2.5))
    assert bool((torch.sigmoid(shifted) > torch.sigmoid(base)).all())


def test_prompt_embeddings_are_deterministic_and_prompt_specific(tiny_model: MuMIC) -> None:
    twin = build_mumic(TINY_ARCH, init_bias=-1.0, seed=0).eval()
    other_seed = build_mumic(TINY_ARCH, init_bias=-1.0, seed=1).eval()
    with torch.inference_mode():
        first = tiny_model.encode_prompts(PROMPTS)
        again = tiny_model.encode_prompts(PROMPTS)
        from_twin = twin.encode_prompts(PROMPTS)
        reversed_order = tiny_model.encode_prompts(PROMPTS[::-1])
        from_other_seed = other_seed.encode_prompts(PROMPTS)
    assert torch.equal(first, again)
    assert torch.equal(first, from_twin)
    torch.testing.assert_close(reversed_order, first.flip(0))
    assert not torch.allclose(first[0], first[1], atol=1e-3)
    assert not torch.allclose(first, from_other_seed, atol=1e-3)


def test_encode_prompts_refuses_a_bare_string(tiny_model: MuMIC) -> None:
    with pytest.raises(TypeError, match="list of prompts"):
        tiny_model.encode_prompts("a photo of something red")  # type: ignore[arg-type]


def test_seeded_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_mumic(TINY_ARCH, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_preprocess_spec_comes_from_the_model() -> None:
    spec = preprocess_spec(build_backbone(TINY_ARCH))
    assert spec.size == 64
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert spec.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert spec.interpolation == "bicubic" and spec.resize_mode == "shortest"


def test_open_clip_config_json_body_can_override_preprocessing() -> None:
    arch = {"model_cfg": TINY_ARCH, "preprocess_cfg": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}
    spec = preprocess_spec(build_backbone(arch))
    assert spec.size == 64 and spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)


def test_unknown_architecture_and_hub_towers_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        build_backbone("ViT-Nope-99")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hf_arch = {**TINY_ARCH, "text_cfg": {"hf_model_name": "some/model", "hf_tokenizer_name": "some/model"}}
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        build_backbone(hf_arch)


# --- checkpoints -----------------------------------------------------------------------------


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of two models is identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different[:5]}"


def test_vit_b_32_checkpoints_load_from_safetensors_and_weights_only_torch_files(tmp_path: Path) -> None:
    """The production loading path, on a checkpoint of the real ViT-B-32 shapes written by the test."""
    torch.manual_seed(0)
    source = build_backbone("ViT-B-32")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    del state
    torch.manual_seed(1)
    target = build_backbone("ViT-B-32")
    assert not torch.equal(target.visual.conv1.weight, source.visual.conv1.weight)
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        torch.manual_seed(1)
        target = build_backbone("ViT-B-32")
        load_clip_weights(target, tmp_path / name)
        assert_same_weights(target, source)
    assert preprocess_spec(target).size == 224


def test_wrapped_and_dataparallel_checkpoints_are_accepted(tmp_path: Path) -> None:
    source = build_mumic(TINY_ARCH, seed=0).backbone
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    target = build_mumic(TINY_ARCH, seed=1).backbone
    load_clip_weights(target, tmp_path / "epoch_3.pt")
    assert_same_weights(target, source)


@pytest.mark.parametrize("writer", ["torch_save", "plain_pickle"])
def test_pickle_checkpoint_with_code_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    sentinel = tmp_path / "pwned"
    live = tmp_path / "live_check"
    pickle.loads(pickle.dumps(Payload(live)))  # proves the payload really runs when unpickled unsafely
    assert live.exists()
    backbone = build_mumic(TINY_ARCH, seed=0).backbone
    checkpoint = {**backbone.state_dict(), "evil": Payload(sentinel)}
    path = tmp_path / "model.pt"
    if writer == "torch_save":
        torch.save(checkpoint, path)
    else:
        path.write_bytes(pickle.dumps(checkpoint))
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_clip_weights(backbone, path)
    assert not sentinel.exists()


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(WeightsError, match="refused checkpoint"):
        load_clip_weights(build_backbone(TINY_ARCH), path)


def test_wrong_shape_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    model = build_backbone(TINY_ARCH)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["visual.proj"] = torch.zeros(64, 32)
    del state["text_projection"]
    state["visual.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_clip_weights(model, tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "bad.safetensors" in message
    assert "missing keys 1: text_projection" in message
    assert "unexpected keys 1: visual.extra_head.weight" in message
    assert "visual.proj (64, 32) != (64, 64)" in message


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    bigger = dict(TINY_ARCH, embed_dim=32)
    save_file(dict(build_backbone(bigger).state_dict()), str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="wrong shapes"):
        load_clip_weights(build_backbone(TINY_ARCH), tmp_path / "other.safetensors")


def test_missing_and_garbage_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    model = build_backbone(TINY_ARCH)
    with pytest.raises(FileNotFoundError):
        load_clip_weights(model, tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="unreadable safetensors"):
        load_clip_weights(model, tmp_path / "junk.safetensors")
