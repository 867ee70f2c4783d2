"""Predictor: a loaded, verified MuMIC artifact on a device (one per Python worker).

Two entry points: `score_uint8` (the runner's: uint8 NHWC pixels already on the device, normalised
there, results left on the device) and `predict` (float pixels in, numpy out: tests, evaluation of
in-memory arrays and the model-only benchmark).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mumic_batch.core.preprocess import PreprocessSpec
from mumic_batch.model.artifact import load_artifact, load_model
from mumic_batch.model.manifest import ClassEntry, Manifest, check_base
from mumic_batch.model.device import autocast, resolve_device, resolve_precision
from mumic_batch.model.mumic import MuMIC, tempered_probs

log = logging.getLogger(__name__)


class ClassLike(Protocol):
    """Anything with a class name, prompt and threshold (ClassEntry, config.ZeroShotClassCfg)."""

    name: str
    prompt: str
    threshold: float


def merge_classes(manifest: Manifest, zero_shot: Sequence[ClassLike], from_base: bool = False
                  ) -> tuple[ClassEntry, ...]:
    """Manifest classes, then zero-shot extras (Manifest.zero_shot_class); duplicate names raise ValueError."""
    extras = tuple(manifest.zero_shot_class(c.name, c.prompt, c.threshold, from_base) for c in zero_shot)
    classes = tuple(manifest.classes) + extras
    names = [c.name for c in classes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate class names (manifest + zero-shot): {dupes}")
    return classes


class Predictor:
    """Scores preprocessed pixel batches: class probabilities and unit-norm image embeddings."""

    def __init__(
        self, model: MuMIC, manifest: Manifest, classes: tuple[ClassEntry, ...], device: torch.device, precision: str,
        compile_model: bool = False, base: MuMIC | None = None, stored: torch.Tensor | None = None,
    ) -> None:
        """Use Predictor.load; this wires an already-loaded model and precomputes the class embeddings.

        `base`: the model that scores the zero-shot extras (the classes after the manifest's own) from
        its own image embedding of the same pixels; None: this model scores every class.
        `stored`: the manifest classes' prompt embeddings from the artifact; None: embed their prompts here.
        """
        self.stored = stored
        self.precision = resolve_precision(precision, device)
        self.model = _on_device(model, device)
        self.manifest = manifest
        self.classes = classes
        self.device = device
        self.spec: PreprocessSpec = manifest.preprocess_spec
        self._mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # default dynamic shapes: the last, partial batch of a task must not trigger a recompile per size
        self._encode = torch.compile(self.model.encode_images) if compile_model else self.model.encode_images
        self.base = None if base is None else _on_device(base, device)
        self._n_own = len(manifest.classes) if base is not None else len(classes)
        self._heads = [self._head(self.model, classes[:self._n_own], None, stored)]
        if self._n_own < len(classes):
            encode = torch.compile(self.base.encode_images) if compile_model else self.base.encode_images
            self._heads.append(self._head(self.base, classes[self._n_own:], encode))
        self.class_emb = torch.cat([h.class_emb for h in self._heads])

    def _head(self, model: MuMIC, classes: Sequence[ClassEntry], encode: Callable | None,
              stored: torch.Tensor | None = None) -> _Head:
        """The classes' head; `stored` holds the embeddings of the first len(stored) of them."""
        parts = [] if stored is None else [stored.to(self.device)]
        prompts = [c.prompt for c in classes[len(stored) if stored is not None else 0:]]
        if prompts:
            with torch.inference_mode(), self._autocast():
                # prompts never change during a run: embed them once, in fp32 after normalisation
                parts.append(model.encode_prompts(prompts).float())
        class_emb = torch.cat(parts)
        a, b = platt_arrays(classes)
        platt = None if a is None else (torch.from_numpy(a).to(self.device), torch.from_numpy(b).to(self.device))
        return _Head(encode, class_emb, model.log_scale, model.bias, platt)

    @classmethod
    def load(
        cls,
        artifact: str,
        zero_shot: Sequence[ClassLike] = (),
        device: str = "auto",
        precision: str = "fp32",
        compile_model: bool = False,
        zero_shot_from: str = "self",
    ) -> Predictor:
        """Load and verify an artifact (local or s3://), add zero-shot classes, move it to the device.

        zero_shot_from="base" scores the zero-shot classes with the base artifact the model was
        fine-tuned from (verified against the sha256 training recorded), with that model's thresholds.
        The device is resolved before anything is read, so 'cuda' on a machine without one fails at once.
        """
        target = resolve_device(device) if isinstance(device, str) else device
        loaded = load_model(artifact, device="cpu")
        manifest = loaded.manifest
        base = _load_base(manifest) if zero_shot_from == "base" and zero_shot else None
        classes = merge_classes(manifest, zero_shot, from_base=base is not None)
        predictor = cls(loaded.model, manifest, classes, target, precision, compile_model, base,
                        loaded.class_embeddings)
        log.info(
            "predictor %s %s on %s (%s%s): %d classes (%d zero-shot%s), %s", manifest.name, manifest.version,
            target, predictor.precision, ", compiled" if compile_model else "", len(classes),
            len(classes) - len(manifest.classes), ", scored by the base model" if base is not None else "",
            "the manifest classes' prompt embeddings read from the artifact" if loaded.class_embeddings is not None
            else "every prompt embedded here (an artifact from before prompt embeddings were stored)",
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

    def _autocast(self):
        return autocast(self.device, self.precision)

    def predict(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[N, 3, S, S] float32 normalised pixels -> (probs [N, C] float32, embeddings [N, D] float32 unit-norm)."""
        batch = torch.as_tensor(pixels)
        self._check_shape(batch)
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, self.embed_dim), np.float32)
        batch = batch.to(self.device, dtype=torch.float32)
        with torch.inference_mode():
            probs, emb = self._scores(batch)
        return probs.cpu().numpy(), emb.cpu().numpy()

    def score_uint8(self, nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N, S, S, 3] on the device -> (probs [N, C], embeddings [N, D]) float32 on the device.

        Normalisation runs on the device with the same float32 operations, in the same order, as
        core.preprocess.normalise, so CPU results equal the numpy path's exactly.
        """
        size = self.spec.size
        if nhwc.ndim != 4 or tuple(nhwc.shape[1:]) != (size, size, 3) or nhwc.dtype != torch.uint8:
            raise ValueError(f"pixels must be uint8 [N, {size}, {size}, 3], got {nhwc.dtype} {list(nhwc.shape)}")
        with torch.inference_mode():
            # permute gives an NCHW view with channels_last strides: no copy
            chw = nhwc.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
            return self._scores(chw)

    def _scores(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            image_emb = self._encode(batch)
            parts = [tempered_probs(image_emb if h.encode is None else h.encode(batch), h.class_emb, h.log_scale,
                                    h.bias, h.platt) for h in self._heads]
        probs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return probs.float(), image_emb.float()

    def _check_shape(self, batch: torch.Tensor) -> None:
        """Fail fast with the expected shape instead of a deep open_clip error."""
        size = self.spec.size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [N, 3, {size}, {size}], got {list(batch.shape)}")

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings [n, D] float32 of free texts (search queries), as prompts are embedded."""
        with torch.inference_mode(), self._autocast():
            return self.model.encode_prompts(list(texts)).float().cpu().numpy()

    def class_head(self, names: Sequence[str]) -> ClassHead:
        """The classes `names` (zero-shot extras or manifest classes) as a ClassHead, for stored embeddings."""
        index = {c.name: i for i, c in enumerate(self.classes)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"classes {missing} are not among the predictor's classes {list(index)}")
        rows = [index[n] for n in names]
        if any(r >= self._n_own for r in rows):
            raise ValueError(f"classes {list(names)} are scored by the base model (model.zero_shot_from=base), "
                             "whose image embeddings are not stored; set model.zero_shot_from=self, or add the "
                             "classes to the base model's own tagged rows (model.artifact=<base artifact>)")
        bias = self.model.bias
        platt_a, platt_b = platt_arrays([self.classes[i] for i in rows])
        return ClassHead(
            names=tuple(names),
            thresholds=self.thresholds[rows],
            class_emb=self.class_emb[rows].cpu().numpy(),
            log_scale=float(self.model.log_scale.detach().cpu()),
            bias=None if bias is None else float(bias.detach().cpu()),
            platt_a=platt_a,
            platt_b=platt_b,
        )

    def with_zero_shot(self, zero_shot: Sequence[ClassLike]) -> Predictor:
        """A predictor sharing this model with a different set of zero-shot classes."""
        classes = merge_classes(self.manifest, zero_shot, from_base=self.base is not None)
        return Predictor(self.model, self.manifest, classes, self.device, self.precision, base=self.base,
                         stored=self.stored)


@dataclass(frozen=True)
class _Head:
    """One model's share of the classes: encode is None for the predictor's own image embedding."""

    encode: Callable | None
    class_emb: torch.Tensor
    log_scale: torch.Tensor
    bias: torch.Tensor | None
    platt: tuple[torch.Tensor, torch.Tensor] | None


def _on_device(model: MuMIC, device: torch.device) -> MuMIC:
    model = model.to(device).eval()
    # The runner hands over NHWC pixels; channels_last convolutions then need no layout change.
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def _load_base(manifest: Manifest) -> MuMIC:
    """The base model recorded in `manifest`, checked to be the exact weights training started from."""
    location, _ = manifest.base_artifact()
    base, base_manifest = load_artifact(location, device="cpu")
    check_base(manifest, base_manifest, location)
    return base


@dataclass(frozen=True)
class ClassHead:
    """Some classes' text embeddings with the model's temperature and bias, without the towers.

    Built once on the driver (Predictor.class_head), small and picklable; `probs` scores stored image
    embeddings through the same tempered sigmoid as tagging, so a class added later gets the values
    tagging with it would have stored (on CPU in fp32; a bf16 GPU run differs in the low bits).
    """

    names: tuple[str, ...]
    thresholds: np.ndarray  # [C] float32, in `names` order
    class_emb: np.ndarray  # [C, D] float32, unit-norm prompt embeddings
    log_scale: float  # float32 value of the model's log temperature
    bias: float | None  # float32 value of the model's logit bias, None for a model without one
    platt_a: np.ndarray | None = None  # [C] float32 per-class calibration slope, None: no class is calibrated
    platt_b: np.ndarray | None = None  # [C] float32 per-class calibration shift

    @property
    def embed_dim(self) -> int:
        return int(self.class_emb.shape[1])

    def probs(self, image_emb: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """[N, D] float32 unit-norm image embeddings -> [N, C] float32 probabilities.

        calibrated=False leaves the classes' Platt scaling out: evaluation's uncalibrated ECE.
        """
        if image_emb.ndim != 2 or image_emb.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be [N, {self.embed_dim}], got {list(image_emb.shape)}")
        bias = None if self.bias is None else torch.tensor(self.bias, dtype=torch.float32)
        platt = None
        if calibrated and self.platt_a is not None:
            platt = (torch.from_numpy(self.platt_a), torch.from_numpy(self.platt_b))
        with torch.inference_mode():
            # Arrow hands over read-only buffers, which torch refuses to wrap: "W" copies those
            probs = tempered_probs(torch.from_numpy(np.require(image_emb, np.float32, ["C", "W"])),
                                   torch.from_numpy(self.class_emb), torch.tensor(self.log_scale, dtype=torch.float32),
                                   bias, platt)
        return probs.numpy()


def platt_arrays(classes: Sequence[ClassEntry]) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Per-class calibration (a [C], b [C]) float32, or (None, None) when every class has the identity.

    None rather than ones and zeros: an uncalibrated model's probabilities stay bit-for-bit what they were.
    """
    if not any(c.calibrated for c in classes):
        return None, None
    return (np.array([c.platt_a for c in classes], dtype=np.float32),
            np.array([c.platt_b for c in classes], dtype=np.float32))
