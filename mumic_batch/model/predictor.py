"""Predictor: a loaded, verified MuMIC artifact as a numpy-in, numpy-out function (one per Python worker)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from mumic_batch.core.preprocess import PreprocessSpec
from mumic_batch.model.artifact import ClassEntry, Manifest, load_artifact
from mumic_batch.model.mumic import MuMIC

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


class ClassLike(Protocol):
    """Anything with a class name, prompt and threshold (ClassEntry, config.ZeroShotClassCfg)."""

    name: str
    prompt: str
    threshold: float


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def merge_classes(manifest_classes: Sequence[ClassEntry], zero_shot: Sequence[ClassLike]) -> tuple[ClassEntry, ...]:
    """Manifest classes, then zero-shot extras marked zero_shot=True; duplicate names raise ValueError."""
    extras = tuple(ClassEntry(name=c.name, prompt=c.prompt, threshold=c.threshold, zero_shot=True) for c in zero_shot)
    classes = tuple(manifest_classes) + extras
    names = [c.name for c in classes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate class names (manifest + zero-shot): {dupes}")
    return classes


class Predictor:
    """Scores preprocessed pixel batches: class probabilities and unit-norm image embeddings."""

    def __init__(
        self, model: MuMIC, manifest: Manifest, classes: tuple[ClassEntry, ...], device: torch.device, precision: str
    ) -> None:
        """Use Predictor.load; this wires an already-loaded model and precomputes the class embeddings."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model = model.to(device).eval()
        self.manifest = manifest
        self.classes = classes
        self.device = device
        self.precision = precision
        self.spec: PreprocessSpec = manifest.preprocess_spec
        with torch.inference_mode(), self._autocast():
            # prompts never change during a run: embed them once, in fp32 after normalisation
            self.class_emb = model.encode_prompts([c.prompt for c in classes]).float()

    @classmethod
    def load(
        cls,
        artifact: str,
        zero_shot: Sequence[ClassLike] = (),
        device: str = "auto",
        precision: str = "fp32",
    ) -> Predictor:
        """Load and verify an artifact (local or s3://), add zero-shot classes, move it to the device."""
        target = resolve_device(device)
        model, manifest = load_artifact(artifact, device="cpu")
        classes = merge_classes(manifest.classes, zero_shot)
        predictor = cls(model, manifest, classes, target, precision)
        log.info(
            "predictor %s %s on %s (%s): %d classes (%d zero-shot)",
            manifest.name, manifest.version, target, precision, len(classes), len(classes) - len(manifest.classes),
        )
        return predictor

    @property
    def model_name(self) -> str:
        """Model name from the manifest."""
        return self.manifest.name

    @property
    def model_version(self) -> str:
        """Model version from the manifest."""
        return self.manifest.version

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights, for tracing every output row to the exact model."""
        return self.manifest.weights_sha256

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in output column order."""
        return tuple(c.name for c in self.classes)

    @property
    def thresholds(self) -> np.ndarray:
        """Per-class decision thresholds [C] float32, in output order."""
        return np.array([c.threshold for c in self.classes], dtype=np.float32)

    @property
    def embed_dim(self) -> int:
        """Embedding size D."""
        return self.manifest.embed_dim

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 autocast only on CUDA with precision='bf16'; a no-op otherwise."""
        if self.device.type == "cuda" and self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[N, 3, S, S] float32 -> (probs [N, C] float32 in [0, 1], embeddings [N, D] float32 unit-norm).

        Accepts a torch tensor too (e.g. already on the GPU from a GPU decode path).
        """
        batch = torch.as_tensor(pixels)
        self._check_shape(batch)
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, self.embed_dim), np.float32)
        batch = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            image_emb = self.model.encode_images(batch)
            probs = torch.sigmoid(self.model.logits(image_emb, self.class_emb))
        return probs.float().cpu().numpy(), image_emb.float().cpu().numpy()

    def _check_shape(self, batch: torch.Tensor) -> None:
        """Fail fast with the expected shape instead of a deep open_clip error."""
        size = self.spec.size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [N, 3, {size}, {size}], got {list(batch.shape)}")

    def with_zero_shot(self, zero_shot: Sequence[ClassLike]) -> Predictor:
        """A predictor sharing this model with a different set of zero-shot classes."""
        classes = merge_classes(self.manifest.classes, zero_shot)
        return Predictor(self.model, self.manifest, classes, self.device, self.precision)
