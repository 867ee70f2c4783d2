"""Versioned MuMIC model artifacts: writing them, and loading them as a model (the manifest: model/manifest.py).

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

from mumic_batch.io.storage import localize_dir
from mumic_batch.model.backbone import Architecture, WeightsError, check_state_dict, preprocess_spec
from mumic_batch.model.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ClassEntry,
    Manifest,
    check_classes,
    check_weights_name,
    read_manifest,
)
from mumic_batch.model.mumic import MuMIC, build_mumic

log = logging.getLogger(__name__)

_PARAM_TOLERANCE = 1e-5
# The manifest classes' prompt embeddings [C, D] float32, stored beside the model's tensors: the
# classifier weights, so a loading worker does not run the text tower over every prompt again.
CLASS_EMBEDDINGS = "class_embeddings"


@dataclass(frozen=True)
class LoadedModel:
    """A verified artifact: the model, its manifest, and its classes' stored prompt embeddings.

    class_embeddings is None for an artifact written before they were stored (the predictor then
    embeds the prompts itself, as it always did).
    """

    model: MuMIC
    manifest: Manifest
    class_embeddings: torch.Tensor | None


def class_embeddings(model: MuMIC, classes: Sequence[ClassEntry]) -> torch.Tensor:
    """The classes' prompt embeddings as the predictor uses them: eval mode, float32, unit-norm, on the CPU."""
    modes = {module: module.training for module in model.modules()}  # a training loop may freeze some in eval
    model.eval()
    try:
        with torch.inference_mode():
            return model.encode_prompts([c.prompt for c in classes]).float().cpu().contiguous()
    finally:
        for module, training in modes.items():
            module.training = training


def _sha256(data: bytes | memoryview) -> str:
    """Hex sha256 of a byte buffer."""
    return hashlib.sha256(data).hexdigest()


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
    classes = check_classes(classes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        tensors[CLASS_EMBEDDINGS] = class_embeddings(model, classes)
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


def _read_verified_weights(artifact_dir: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Read the weights once, check size and sha256 on those bytes, then parse them with safetensors."""
    check_weights_name(manifest)
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


def load_artifact(
    path_or_uri: str | os.PathLike[str], device: str | torch.device = "cpu", cache_dir: str | None = None
) -> tuple[MuMIC, Manifest]:
    """Load a verified artifact (local dir, file:// or s3:// prefix) as an eval-mode MuMIC on `device`."""
    loaded = load_model(path_or_uri, device, cache_dir)
    return loaded.model, loaded.manifest


def load_model(
    path_or_uri: str | os.PathLike[str], device: str | torch.device = "cpu", cache_dir: str | None = None
) -> LoadedModel:
    """load_artifact, with the classes' stored prompt embeddings (checked against the manifest)."""
    artifact_dir = localize_dir(str(path_or_uri), cache_dir=cache_dir)
    manifest = read_manifest(artifact_dir)
    state_dict = _read_verified_weights(artifact_dir, manifest)
    stored = state_dict.pop(CLASS_EMBEDDINGS, None)
    if stored is not None:
        _check_class_embeddings(stored, manifest, artifact_dir)
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
    return LoadedModel(model.to(device).eval(), manifest, stored)


def _check_class_embeddings(stored: torch.Tensor, manifest: Manifest, source: Path) -> None:
    expected = (len(manifest.classes), manifest.embed_dim)
    if tuple(stored.shape) != expected or stored.dtype != torch.float32 or not bool(torch.isfinite(stored).all()):
        raise ArtifactError(f"{source}: stored {CLASS_EMBEDDINGS} are {stored.dtype} {tuple(stored.shape)}, "
                            f"expected finite float32 {expected} (one row per manifest class)")


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
