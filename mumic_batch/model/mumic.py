"""MuMIC: a CLIP dual encoder whose class prompts' text embeddings are the classifier weights.

P(class j | image i) = sigmoid(exp(log_scale) * cos(image_i, prompt_j) + bias): the tempered sigmoid.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mumic_batch.io.storage import localize_file
from mumic_batch.model.backbone import (
    Architecture,
    Backbone,
    build_backbone,
    build_tokenizer,
    load_clip_weights,
    resolve_architecture,
    skip_init,
)

log = logging.getLogger(__name__)


class MuMIC(nn.Module):
    """Tempered-sigmoid multi-label classifier on top of an open_clip dual encoder."""

    def __init__(
        self,
        backbone: Backbone,
        architecture: Architecture,
        init_bias: float | None = None,
        init_log_scale: float | None = None,
    ) -> None:
        """Wrap `backbone`; log_scale starts at the backbone's logit_scale unless `init_log_scale` is given.

        Args:
            backbone: open_clip model (CLIP or CustomTextCLIP).
            architecture: the name or config dict it was built from (kept for tokenisation and artifacts).
            init_bias: None for no bias term; else the initial learnable bias (e.g. -10 sigmoid-loss style,
                which starts every pair near P=0 instead of the all-positive start of a zero bias).
            init_log_scale: initial log temperature scale; default CLIP's own logit_scale.
        """
        super().__init__()
        self.backbone = backbone
        self.architecture = architecture
        self.tokenizer = build_tokenizer(architecture)
        start = float(backbone.logit_scale.detach().reshape(-1)[0]) if init_log_scale is None else init_log_scale
        self.log_scale = nn.Parameter(torch.tensor(start, dtype=torch.float32))
        self.bias = None if init_bias is None else nn.Parameter(torch.tensor(float(init_bias)))

    @property
    def embed_dim(self) -> int:
        """Size of the joint embedding space."""
        return int(resolve_architecture(self.architecture)[0]["embed_dim"])

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.log_scale.device

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Image embeddings, L2-normalised in float32: [N, 3, S, S] -> [N, D]."""
        features = self.backbone.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids for prompts, on the model's device."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        return self.tokenizer(list(prompts)).to(self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Class weights: prompt text embeddings, L2-normalised in float32, [C, D]."""
        features = self.backbone.encode_text(self.tokenize(prompts))
        return F.normalize(features.float(), dim=-1)

    def logits(self, image_emb: Tensor, class_emb: Tensor) -> Tensor:
        """Tempered logits exp(log_scale) * cos + bias, [N, C]; inputs must already be unit-norm."""
        return tempered_logits(image_emb, class_emb, self.log_scale, self.bias)

    def forward(self, pixels: Tensor, class_emb: Tensor) -> tuple[Tensor, Tensor]:
        """Return (logits [N, C], image embeddings [N, D]); probabilities are sigmoid(logits).

        Logits rather than probabilities so that training can use the numerically stable BCE-with-logits.
        `class_emb` comes from encode_prompts (inside the autograd graph when the text tower trains).
        """
        image_emb = self.encode_images(pixels)
        return self.logits(image_emb, class_emb), image_emb


def tempered_logits(image_emb: Tensor, class_emb: Tensor, log_scale: Tensor, bias: Tensor | None) -> Tensor:
    """exp(log_scale) * (image_emb @ class_emb.T) + bias in float32, [N, C]; embeddings must be unit-norm."""
    logits = log_scale.exp() * (image_emb.float() @ class_emb.float().T)
    return logits if bias is None else logits + bias


def tempered_probs(image_emb: Tensor, class_emb: Tensor, log_scale: Tensor, bias: Tensor | None,
                   platt: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The tempered sigmoid: the probabilities tagging stores, and add_labels computes from stored embeddings.

    `platt` is the per-class calibration (a [C], b [C]) of the manifest's classes: sigmoid(a * logit + b).
    Every path from logits to stored probabilities comes through here, so all of them apply the same one.
    """
    logits = tempered_logits(image_emb, class_emb, log_scale, bias)
    if platt is not None:
        logits = logits * platt[0] + platt[1]
    return torch.sigmoid(logits)


def build_mumic(
    arch: Architecture,
    clip_weights: str | os.PathLike[str] | None = None,
    init_bias: float | None = None,
    seed: int | None = None,
    initialise: bool = True,
) -> MuMIC:
    """Build a MuMIC model: seeded random init (global RNG untouched), then CLIP weights (local path or s3://) if given.

    `initialise=False` skips the random init: the caller loads a complete state dict (strict) next.
    """
    with torch.random.fork_rng(devices=[]), (skip_init() if clip_weights or not initialise else nullcontext()):
        if seed is not None:
            torch.manual_seed(seed)
        backbone = build_backbone(arch)
    if clip_weights is not None:
        load_clip_weights(backbone, localize_file(str(clip_weights)))
    return MuMIC(backbone, arch, init_bias=init_bias)
