"""The model artifact's manifest and its checks: no torch, so the Spark driver can verify an artifact cheaply.

A model artifact is a directory with manifest.json and weights.safetensors (docs/model_artifact.md).
The driver of a tagging run reads the manifest and streams the weights through sha256 here; the
Python workers load the model with mumic_batch.model.artifact, which checks the same bytes again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mumic_batch.core.preprocess import PreprocessSpec
from mumic_batch.io.storage import read_member, sha256_member

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest is a few KB; refuse anything absurd before parsing


class ArtifactError(ValueError):
    """A model artifact is missing, malformed, of an unknown format version, or fails its checksum."""


_CORE_CLASS_FIELDS = 4  # name, prompt, threshold, zero_shot: every manifest has them


@dataclass(frozen=True)
class ClassEntry:
    """One output class: its name in the tables, its prompt (classifier weight) and decision threshold."""

    name: str  # class name as stored in the outputs
    prompt: str  # text prompt whose embedding is the class weight
    threshold: float = 0.5  # probability at or above which the label is assigned
    zero_shot: bool = False  # True: not trained on, scored through its prompt only
    # What validation says about the threshold (written by jobs/train.py; None in older manifests).
    assign: bool = True  # False: the class is never assigned (it cannot reach its target precision); see `note`
    note: str = ""  # how the threshold was chosen, or why the class gets no label
    target_precision: float | None = None  # the precision the threshold was chosen for
    support: int | None = None  # validation positives
    auc: float | None = None  # validation ROC AUC (for a zero-shot class: how far its prompt can be trusted)
    expected_precision: float | None = None  # bootstrap median of the validation precision at the threshold
    precision_low: float | None = None  # bootstrap interval of that precision (train.threshold_ci)
    precision_high: float | None = None
    expected_recall: float | None = None  # bootstrap median of the validation recall at the threshold
    recall_low: float | None = None
    recall_high: float | None = None
    # Calibration (train.calibration; absent in older manifests: the identity). Every stored probability
    # is sigmoid(platt_a * logit + platt_b), and the threshold above is on that calibrated probability.
    platt_a: float = 1.0
    platt_b: float = 0.0
    calibration: str = ""  # how platt_a and platt_b were fitted, or why the class kept the identity

    def __post_init__(self) -> None:
        if not self.name or not self.prompt:
            raise ValueError(f"class needs a non-empty name and prompt: {self!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"class {self.name!r}: threshold {self.threshold} outside [0, 1]")
        # a <= 0 would reverse the class's ranking; NaN or inf would poison every probability
        if not (math.isfinite(self.platt_a) and self.platt_a > 0 and math.isfinite(self.platt_b)):
            raise ValueError(f"class {self.name!r}: calibration platt_a={self.platt_a}, platt_b={self.platt_b} "
                             "needs a finite platt_a > 0 and a finite platt_b")

    @property
    def calibrated(self) -> bool:
        """True when the class's probabilities are scaled (not the identity)."""
        return (self.platt_a, self.platt_b) != (1.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; validation fields still at their defaults are left out, as older manifests have them."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self)[_CORE_CLASS_FIELDS:]:
            if out[f.name] == f.default:
                del out[f.name]
        return out

    @property
    def effective_threshold(self) -> float:
        """The threshold to compare probabilities with: infinite for a class that is never assigned."""
        return self.threshold if self.assign else math.inf


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild, verify and trace a model, stored as manifest.json."""

    format_version: int  # artifact format; loaders refuse versions they do not know
    name: str  # model name, e.g. "mumic-demo"
    version: str  # model version written into every output row
    architecture: str | dict[str, Any]  # open_clip built-in name or model-config dict
    embed_dim: int  # embedding size D
    preprocess: dict[str, Any]  # PreprocessSpec fields (size, mean, std, interpolation, resize_mode)
    classes: tuple[ClassEntry, ...]  # trained classes in output order
    log_scale: float  # learned log temperature scale (copy of the weights' `log_scale`, for reading)
    bias: float | None  # learned logit bias, or None when the model has none
    training_data: dict[str, Any]  # reference to the training data (table, version, split, seed, ...)
    metrics: dict[str, Any]  # evaluation summary (e.g. {"gap": 0.83, "map_macro": 0.9})
    weights_file: str  # weights file name inside the artifact directory
    weights_sha256: str  # hex sha256 of the weights file
    weights_size: int  # size of the weights file in bytes (checked before reading it)
    created_at: str  # ISO-8601 UTC creation time

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The preprocessing this model expects, as a PreprocessSpec."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.preprocess.items()}
        return PreprocessSpec(**fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["classes"] = [c.to_dict() for c in self.classes]
        return out

    def zero_shot_class(self, name: str, prompt: str, threshold: float, from_base: bool = False) -> ClassEntry:
        """A config zero-shot class as this model (or, `from_base`, its base model) should score it.

        The training run stores, per zero-shot class its validation split labels (metrics.zero_shot,
        and metrics.zero_shot_base for the base model it started from), the threshold chosen for that
        model, its validation AUC and whether it can be assigned at all; a config threshold knows none
        of that. The stored entry wins when its prompt is the same.
        """
        known = (self.metrics.get("zero_shot_base" if from_base else "zero_shot") or {}).get(name)
        if known and known.get("prompt") == prompt:
            return ClassEntry(**{**known, "zero_shot": True})
        return ClassEntry(name, prompt, threshold, zero_shot=True)

    def base_artifact(self) -> tuple[str, str]:
        """(location, weights sha256) of the MuMIC artifact this model was fine-tuned from, as training recorded."""
        base = self.training_data.get("base") or {}
        if not base.get("artifact") or not base.get("weights_sha256"):
            started = f"open_clip weights {base['clip_weights']}" if base.get("clip_weights") else "no recorded base"
            raise ArtifactError(
                f"model {self.name} {self.version} has no base MuMIC artifact to score zero-shot classes with "
                f"({started}); set model.zero_shot_from=self, or fine-tune from a MuMIC artifact (train.base)")
        return str(base["artifact"]), str(base["weights_sha256"])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> Manifest:
        """Parse a manifest dict; unknown or missing fields raise ArtifactError."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: unsupported artifact format_version {version!r} (this code reads {FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(data.keys() - names), sorted(names - data.keys())
        if unknown or missing:
            raise ArtifactError(f"{source}: unknown fields {unknown}, missing fields {missing}")
        try:
            classes = tuple(ClassEntry(**c) for c in data["classes"])
            return cls(**{**data, "classes": classes})
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: invalid manifest: {exc}") from exc


def check_classes(classes: Sequence[ClassEntry]) -> tuple[ClassEntry, ...]:
    """Classes as a tuple; refuse an empty list and duplicate names."""
    classes = tuple(classes)
    if not classes:
        raise ValueError("a model needs at least one class")
    names = [c.name for c in classes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate class names: {dupes}")
    return classes


def read_manifest(artifact_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate manifest.json of a local artifact directory."""
    path = Path(artifact_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"not a model artifact: {path} is missing")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: manifest larger than {_MAX_MANIFEST_BYTES} bytes")
    return _parse_manifest(path.read_bytes(), str(path))


def _parse_manifest(raw: bytes, source: str) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise ArtifactError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{source}: manifest must be a JSON object")
    return Manifest.from_dict(data, source=source)


def check_artifact(uri: str | os.PathLike[str], client: Any | None = None) -> Manifest:
    """The manifest of the artifact at `uri` (local, file:// or s3://), its weights' size and sha256 checked.

    For the Spark driver: the weights are streamed through the hash once and not kept, and no model
    is built; the workers that load the model check the same sha256 again on the bytes they parse.
    """
    manifest = read_artifact_manifest(uri, client)
    check_weights(uri, manifest, client)
    return manifest


def read_artifact_manifest(uri: str | os.PathLike[str], client: Any | None = None) -> Manifest:
    """The manifest of the artifact at `uri`, parsed and checked; its weights are not read (check_weights)."""
    uri = str(uri)
    try:
        raw = read_member(uri, MANIFEST_FILE, _MAX_MANIFEST_BYTES, client)
    except FileNotFoundError as exc:
        raise ArtifactError(f"not a model artifact: {uri}/{MANIFEST_FILE} is missing ({exc})") from exc
    manifest = _parse_manifest(raw, f"{uri}/{MANIFEST_FILE}")
    check_weights_name(manifest)
    return manifest


def check_weights(uri: str | os.PathLike[str], manifest: Manifest, client: Any | None = None) -> None:
    """Stream the artifact's weights through sha256; raise ArtifactError unless size and hash match `manifest`."""
    uri = str(uri)
    try:
        size, sha = sha256_member(uri, manifest.weights_file, client)
    except FileNotFoundError as exc:
        raise ArtifactError(f"weights file missing: {uri}/{manifest.weights_file} ({exc})") from exc
    if size != manifest.weights_size:
        raise ArtifactError(f"weights file {uri}/{manifest.weights_file} has {size} bytes, "
                            f"manifest says {manifest.weights_size}")
    if sha != manifest.weights_sha256:
        raise ArtifactError(f"sha256 mismatch for {uri}/{manifest.weights_file}: manifest "
                            f"{manifest.weights_sha256}, file {sha}; refusing to load")


def check_weights_name(manifest: Manifest) -> None:
    if Path(manifest.weights_file).name != manifest.weights_file or manifest.weights_file in ("", ".", ".."):
        raise ArtifactError(f"weights_file must be a plain file name, got {manifest.weights_file!r}")


def check_base(manifest: Manifest, base: Manifest, location: str) -> None:
    """`base` (read from `location`) is the exact model `manifest` was fine-tuned from, and takes the same pixels."""
    _, sha256 = manifest.base_artifact()
    if base.weights_sha256 != sha256:
        raise ArtifactError(f"base model {location} has weights {base.weights_sha256}, but {manifest.name} "
                            f"{manifest.version} was fine-tuned from {sha256}; restore that artifact there, or set "
                            "model.zero_shot_from=self")
    if base.preprocess_spec != manifest.preprocess_spec:
        raise ArtifactError(f"base model {location} preprocesses images as {base.preprocess}, {manifest.name} "
                            f"as {manifest.preprocess}: one pixel batch cannot feed both")
    log.info("zero-shot classes scored by the base model %s %s from %s", base.name, base.version, location)
