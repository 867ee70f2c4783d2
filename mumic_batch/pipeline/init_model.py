"""Write a starting model artifact: an architecture, optional CLIP weights, the sample classes."""

from __future__ import annotations

import logging

from mumic_batch.config import InitModelCfg
from mumic_batch.core.sample import fine_tune_classes
from mumic_batch.model.artifact import save_artifact
from mumic_batch.model.manifest import ClassEntry
from mumic_batch.model.backbone import named_architecture
from mumic_batch.model.mumic import build_mumic

log = logging.getLogger(__name__)

JOB = "init_model"


def architecture(name: str):
    """"tiny" and "demo" are the project's small configs; anything else is an open_clip model name."""
    return named_architecture(name)


def run(cfg: InitModelCfg, out_dir: str) -> dict:
    """Build the model (seeded), attach the sample catalogue's fine-tuning classes, save the artifact."""
    model = build_mumic(architecture(cfg.architecture), clip_weights=cfg.clip_weights or None, seed=cfg.seed)
    classes = [ClassEntry(c.name, c.prompt) for c in fine_tune_classes()]
    manifest = save_artifact(
        out_dir, model, name=cfg.name, version=cfg.version, classes=classes,
        training_data={"kind": "clip_weights" if cfg.clip_weights else "untrained", "seed": cfg.seed,
                       "clip_weights": cfg.clip_weights or None},
        overwrite=True,
    )
    return {"job": JOB, "model": out_dir, "name": manifest.name, "version": manifest.version,
            "classes": len(classes), "weights_sha256": manifest.weights_sha256}
