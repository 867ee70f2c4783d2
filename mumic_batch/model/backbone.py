"""CLIP backbones: build an open_clip model offline, load open_clip checkpoints safely, derive preprocessing.

Nothing here downloads: architectures are built with random weights and weights come only from
local files (safetensors, or a torch checkpoint read with the weights-only unpickler).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, get_model_preprocess_cfg, set_model_preprocess_cfg

from mumic_batch.core.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

Architecture = Union[str, Mapping[str, Any]]
Backbone = Union[CLIP, CustomTextCLIP]

# A small ViT CLIP for tests and the demo: ~3.4M parameters (3.2M of them the token embedding),
# a 64-image forward takes ~10 ms on 2 CPU cores. Same open_clip model-config JSON shape as ViT-B-32.
TINY_ARCH: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# The demo/stand-in architecture that jobs/pretrain.py trains from scratch on the sample catalogue:
# - a small ModifiedResNet (~0.34M parameters) instead of a ViT: on a few hundred images a ViT learns colours
#   but not textures or shapes, convolutions learn backgrounds and counts too (measured, docs/learning.md);
# - 96 px input: stripes, checks and dots of the 640x480 sample survive the downscale, at 64 px many do not;
# - "squash" resizing: a centre crop of the 4:3 sample images would cut off digits near the left/right edges;
# - text context 64: the sample's captions reach ~42 tokens, so nothing is truncated.
DEMO_ARCH: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 96, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
        "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"resize_mode": "squash"},
}
SMALL_ARCHITECTURES: dict[str, dict[str, Any]] = {"tiny": TINY_ARCH, "demo": DEMO_ARCH}

_OPENAI_PREPROCESS: dict[str, Any] = {
    "mean": open_clip.OPENAI_DATASET_MEAN,
    "std": open_clip.OPENAI_DATASET_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
_HF_OFFLINE_VALUES = ("1", "true", "yes", "on")
_MAX_LISTED_KEYS = 10


class WeightsError(ValueError):
    """A CLIP checkpoint is refused: unsafe format, unreadable, or keys/shapes that do not match the model."""


def resolve_architecture(arch: Architecture) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (model_cfg, preprocess_cfg overrides) for an open_clip name or config dict.

    A dict is either a model config (embed_dim, vision_cfg, text_cfg, ...) or an open_clip
    `open_clip_config.json` body ({"model_cfg": ..., "preprocess_cfg": ...}).
    """
    if isinstance(arch, str):
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None or arch.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"unknown open_clip architecture {arch!r}; pass a built-in name or a config dict")
        return copy.deepcopy(model_cfg), {}
    arch = copy.deepcopy(dict(arch))
    if "model_cfg" in arch:
        return dict(arch["model_cfg"]), dict(arch.get("preprocess_cfg", {}))
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - arch.keys()
    if missing:
        raise ValueError(f"architecture dict lacks {sorted(missing)}")
    return arch, {}


def named_architecture(name: str) -> Architecture:
    """"tiny"/"demo" -> the project's small configs (a copy); anything else is an open_clip name, kept as is."""
    return copy.deepcopy(SMALL_ARCHITECTURES[name]) if name in SMALL_ARCHITECTURES else name


def _require_hf_offline(what: str) -> None:
    """Refuse Hugging Face-backed towers unless the hub is forced offline, so they can only read the local cache."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in _HF_OFFLINE_VALUES:
        raise ValueError(
            f"{what} needs the Hugging Face hub; set HF_HUB_OFFLINE=1 with a pre-populated HF cache "
            "(this pipeline never downloads)"
        )


# torch.nn.init's in-place initialisers; skip_init() turns them into no-ops.
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "orthogonal_",
                 "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def skip_init():
    """Build modules without drawing their random initial weights (0.9 s for a ViT-B-32 on one core).

    Only for a model whose every parameter and persistent buffer is then loaded from a state dict
    with strict=True: the skipped parameters hold whatever memory torch.empty gave them.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def build_backbone(arch: Architecture) -> Backbone:
    """Build an open_clip model with random weights from a built-in name or a config dict; never downloads."""
    model_cfg, preprocess_overrides = resolve_architecture(arch)
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # timm would otherwise fetch ImageNet weights
    if "hf_model_name" in text_cfg:
        _require_hf_offline(f"text tower {text_cfg['hf_model_name']!r}")
        text_cfg["hf_model_pretrained"] = False
    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa (multimodal_cfg) architectures are not supported: MuMIC needs a dual encoder")
    custom_text = bool(model_cfg.pop("custom_text", False)) or "hf_model_name" in text_cfg
    model: Backbone = (CustomTextCLIP if custom_text else CLIP)(**model_cfg)
    preprocess = {**_OPENAI_PREPROCESS, **preprocess_overrides, "size": model.visual.image_size}
    set_model_preprocess_cfg(model, preprocess)
    return model


@functools.lru_cache(maxsize=8)
def _tokenizer_for(arch_key: str) -> Any:
    """Cache tokenizers: building the BPE tables takes a noticeable fraction of a second."""
    arch = json.loads(arch_key)
    if isinstance(arch, str):
        model_cfg, _ = resolve_architecture(arch)
        if model_cfg["text_cfg"].get("hf_tokenizer_name") or "siglip" in arch.lower():
            _require_hf_offline(f"tokenizer of {arch!r}")
        return open_clip.get_tokenizer(arch)
    model_cfg, _ = resolve_architecture(arch)
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        _require_hf_offline(f"tokenizer {text_cfg['hf_tokenizer_name']!r}")
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77)
        )
    return open_clip.SimpleTokenizer(
        context_length=text_cfg.get("context_length", 77), **text_cfg.get("tokenizer_kwargs", {})
    )


def build_tokenizer(arch: Architecture) -> Any:
    """Return the tokenizer matching an architecture (open_clip's bundled BPE for CLIP-style text towers)."""
    return _tokenizer_for(json.dumps(arch, sort_keys=True))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read an open_clip-format state dict from a local file without ever running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            checkpoint: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"unreadable safetensors checkpoint {path}: {exc}") from exc
    else:
        try:
            # weights_only=True ONLY: no fallback, an unpickling error means the file is refused
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(
                f"refused checkpoint {path}: not loadable with torch.load(weights_only=True) "
                f"(pickled code objects and TorchScript archives are never loaded): {exc}"
            ) from exc
    return _unwrap_state_dict(checkpoint, path)


def _unwrap_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept {"state_dict": ...} wrappers and DataParallel "module." prefixes; require tensors only."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise WeightsError(f"checkpoint {path} holds no state dict (got {type(checkpoint).__name__})")
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"checkpoint {path} has non-tensor entries: {not_tensors[:_MAX_LISTED_KEYS]}")
    if all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module.") :]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def _listed(keys: list[str]) -> str:
    """Format a key list for an error message, truncated but with the total count."""
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = f" (+{len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming missing, unexpected and wrong-shape keys; silent when they match exactly."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong_shape = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes (checkpoint != model) {_listed(wrong_shape)}")
    if problems:
        raise WeightsError(f"checkpoint {source} does not match the model: " + "; ".join(problems))


def load_clip_weights(model: Backbone, path: str | os.PathLike[str]) -> None:
    """Load an open_clip-format checkpoint (.safetensors, or a weights-only torch file) into `model`, strictly."""
    state_dict = read_checkpoint(path)
    logit_scale = state_dict.get("logit_scale")
    if logit_scale is not None and logit_scale.ndim != model.logit_scale.ndim:
        # open_clip stores logit_scale as a 0-d or a [1] tensor depending on the version
        state_dict["logit_scale"] = logit_scale.reshape(model.logit_scale.shape)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True)
    log.info("loaded %d CLIP tensors from %s", len(state_dict), path)


def preprocess_spec(model: Backbone) -> PreprocessSpec:
    """Preprocessing the model expects: its input size and normalisation (OpenAI mean/std by default)."""
    cfg = {**_OPENAI_PREPROCESS, **get_model_preprocess_cfg(model)}
    size = model.visual.image_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square input size {tuple(size)} is not supported")
        size = size[0]
    return PreprocessSpec(
        size=int(size),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=str(cfg["interpolation"]),
        resize_mode=str(cfg["resize_mode"]),
        fill_color=int(cfg.get("fill_color", 0)),
    )
