"""Versioned MuMIC model artifacts: a directory with manifest.json and weights.safetensors.

Loading checks the format version, the weights' size and sha256 (on the exact bytes that are then
parsed, so nothing can change in between), and reads the weights with safetensors: nothing is ever
unpickled. docs/model_artifact.md describes the format.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from mumic_batch.core.preprocess import PreprocessSpec
from mumic_batch.io.storage import localize_dir, read_member, sha256_member
from mumic_batch.model.backbone import Architecture, WeightsError, check_state_dict, preprocess_spec
from mumic_batch.model.mumic import MuMIC, build_mumic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest is a few KB; refuse anything absurd before parsing
_PARAM_TOLERANCE = 1e-5


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


def _sha256(data: bytes | memoryview) -> str:
    """Hex sha256 of a byte buffer."""
    return hashlib.sha256(data).hexdigest()


def _check_classes(classes: Sequence[ClassEntry]) -> tuple[ClassEntry, ...]:
    """Classes as a tuple; refuse an empty list and duplicate names."""
    classes = tuple(classes)
    if not classes:
        raise ValueError("a model needs at least one class")
    names = [c.name for c in classes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate class names: {dupes}")
    return classes


def _json_normalised(manifest: Manifest) -> Manifest:
    """The manifest exactly as it reads back from JSON (tuples inside dicts become lists)."""
    return Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename a finished temp directory into place; an existing artifact is replaced only with overwrite."""
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"artifact already exists: {out_dir} (pass overwrite=True to replace it)")
        stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, stale / out_dir.name)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, out_dir)


def save_artifact(
    out_dir: str | os.PathLike[str],
    model: MuMIC,
    *,
    name: str,
    version: str,
    classes: Sequence[ClassEntry],
    training_data: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write manifest.json + weights.safetensors to a temp dir beside `out_dir`, then rename it into place."""
    out_dir = Path(out_dir)
    classes = _check_classes(classes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        weights_path = tmp / WEIGHTS_FILE
        # one metadata key only: safetensors writes a multi-key map in random order, and the same weights
        # should always give the same bytes (and sha256)
        save_file(tensors, str(weights_path), metadata={"format": "pt"})
        data = weights_path.read_bytes()
        manifest = _json_normalised(Manifest(
            format_version=FORMAT_VERSION,
            name=name,
            version=version,
            architecture=model.architecture if isinstance(model.architecture, str) else dict(model.architecture),
            embed_dim=model.embed_dim,
            preprocess=dataclasses.asdict(preprocess_spec(model.backbone)),
            classes=classes,
            log_scale=float(model.log_scale.detach()),
            bias=None if model.bias is None else float(model.bias.detach()),
            training_data=dict(training_data or {}),
            metrics=dict(metrics or {}),
            weights_file=WEIGHTS_FILE,
            weights_sha256=_sha256(data),
            weights_size=len(data),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        ))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved artifact %s %s (%d classes, sha256 %s) to %s", name, version, len(classes),
             manifest.weights_sha256[:12], out_dir)
    return manifest


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
    uri = str(uri)
    try:
        raw = read_member(uri, MANIFEST_FILE, _MAX_MANIFEST_BYTES, client)
    except FileNotFoundError as exc:
        raise ArtifactError(f"not a model artifact: {uri}/{MANIFEST_FILE} is missing ({exc})") from exc
    manifest = _parse_manifest(raw, f"{uri}/{MANIFEST_FILE}")
    _check_weights_name(manifest)
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
    return manifest


def _check_weights_name(manifest: Manifest) -> None:
    if Path(manifest.weights_file).name != manifest.weights_file or manifest.weights_file in ("", ".", ".."):
        raise ArtifactError(f"weights_file must be a plain file name, got {manifest.weights_file!r}")


def _read_verified_weights(artifact_dir: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Read the weights once, check size and sha256 on those bytes, then parse them with safetensors."""
    _check_weights_name(manifest)
    path = artifact_dir / manifest.weights_file
    if not path.is_file():
        raise ArtifactError(f"weights file missing: {path}")
    size = path.stat().st_size
    if size != manifest.weights_size:
        raise ArtifactError(f"weights file {path} has {size} bytes, manifest says {manifest.weights_size}")
    data = path.read_bytes()
    actual = _sha256(data)
    if actual != manifest.weights_sha256:
        raise ArtifactError(
            f"sha256 mismatch for {path}: manifest {manifest.weights_sha256}, file {actual}; refusing to load"
        )
    try:
        return load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error type for malformed headers
        raise ArtifactError(f"weights file {path} is not valid safetensors: {exc}") from exc


def _check_scalar(name: str, in_manifest: float | None, tensor: torch.Tensor | None, source: Path) -> None:
    """The manifest's copy of a scalar parameter must agree with the weights."""
    in_weights = None if tensor is None else float(tensor)
    if (in_manifest is None) != (in_weights is None) or (
        in_manifest is not None and abs(in_manifest - in_weights) > _PARAM_TOLERANCE * max(1.0, abs(in_manifest))
    ):
        raise ArtifactError(f"{source}: manifest {name}={in_manifest} disagrees with the weights ({in_weights})")


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


def load_artifact(
    path_or_uri: str | os.PathLike[str], device: str | torch.device = "cpu", cache_dir: str | None = None
) -> tuple[MuMIC, Manifest]:
    """Load a verified artifact (local dir, file:// or s3:// prefix) as an eval-mode MuMIC on `device`."""
    artifact_dir = localize_dir(str(path_or_uri), cache_dir=cache_dir)
    manifest = read_manifest(artifact_dir)
    state_dict = _read_verified_weights(artifact_dir, manifest)
    model = build_mumic(manifest.architecture, init_bias=None if manifest.bias is None else 0.0, initialise=False)
    try:
        check_state_dict(model, state_dict, str(artifact_dir / manifest.weights_file))
    except WeightsError as exc:
        raise ArtifactError(str(exc)) from exc
    model.load_state_dict(state_dict, strict=True)
    _check_scalar("log_scale", manifest.log_scale, state_dict["log_scale"], artifact_dir)
    _check_scalar("bias", manifest.bias, state_dict.get("bias"), artifact_dir)
    if model.embed_dim != manifest.embed_dim:
        raise ArtifactError(f"{artifact_dir}: embed_dim {manifest.embed_dim} != architecture's {model.embed_dim}")
    log.info("loaded artifact %s %s from %s", manifest.name, manifest.version, path_or_uri)
    return model.to(device).eval(), manifest


def create_untrained_artifact(
    out_dir: str | os.PathLike[str],
    arch: Architecture,
    classes: Sequence[ClassEntry],
    name: str,
    version: str,
    seed: int,
    *,
    init_bias: float | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write an artifact of a seeded random-init model (tests and bootstrapping; predictions are meaningless)."""
    model = build_mumic(arch, init_bias=init_bias, seed=seed)
    return save_artifact(
        out_dir,
        model,
        name=name,
        version=version,
        classes=classes,
        training_data={"kind": "untrained", "seed": seed},
        overwrite=overwrite,
    )
