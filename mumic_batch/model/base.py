"""The model fine-tuning starts from: a MuMIC artifact, or open_clip weights from a path, S3 or the offline HF cache."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from mumic_batch.config import TrainCfg
from mumic_batch.model.artifact import load_artifact
from mumic_batch.model.backbone import named_architecture
from mumic_batch.model.mumic import MuMIC, build_mumic

log = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"
# The file names open_clip publishes on the Hugging Face hub, safest first.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_OFFLINE_VALUES = ("1", "true", "yes", "on")


def resolve_clip_weights(ref: str) -> str:
    """A local path, file:// or s3:// reference as is; hf-hub:org/repo -> its weights file in the local HF cache.

    The Hugging Face cache is read with local_files_only=True and HF_HUB_OFFLINE must be set: nothing is
    ever downloaded here.
    """
    if not ref.startswith(HF_PREFIX):
        return ref
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in _HF_OFFLINE_VALUES:
        raise ValueError(f"{ref}: set HF_HUB_OFFLINE=1 (with a pre-populated cache); this pipeline never downloads")
    from huggingface_hub import hf_hub_download  # local import: only this branch needs it

    repo = ref[len(HF_PREFIX):]
    for filename in HF_WEIGHT_FILES:
        try:
            return hf_hub_download(repo, filename, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - the hub raises several "not in cache" types
            log.debug("%s not in the local HF cache: %s", filename, err)
    raise FileNotFoundError(f"{ref}: none of {HF_WEIGHT_FILES} is in the local Hugging Face cache")


def load_base(cfg: TrainCfg) -> tuple[MuMIC, dict[str, Any]]:
    """The starting MuMIC model (CPU, eval mode) and a reference to it for the manifest."""
    if cfg.clip_weights:
        weights = resolve_clip_weights(cfg.clip_weights)
        model = build_mumic(named_architecture(cfg.architecture), clip_weights=weights)
        ref: dict[str, Any] = {"clip_weights": cfg.clip_weights, "architecture": cfg.architecture}
    else:
        model, manifest = load_artifact(cfg.base)
        ref = {"artifact": cfg.base, "name": manifest.name, "version": manifest.version,
               "weights_sha256": manifest.weights_sha256}
    set_bias(model, cfg.bias, cfg.init_bias)
    return model.eval(), ref


def set_bias(model: MuMIC, bias: bool, init_bias: float) -> None:
    """Give the model a learnable bias starting at init_bias (keeping one it already has), or remove it."""
    if bias and model.bias is None:
        model.bias = nn.Parameter(torch.tensor(float(init_bias), device=model.device))
    elif not bias and model.bias is not None:
        log.warning("train.bias is false: dropping the base model's bias (%.3f)", model.bias.item())
        model.bias = None
