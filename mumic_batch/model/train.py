"""MuMIC fine-tuning: hardness-aware tempered-sigmoid BCE over every image x class pair.

The classifier weights are the class prompts' text embeddings, the logits exp(log_scale) * cos + bias
(model/mumic.py). Training is seeded and, on the CPU, bit-for-bit reproducible: batch order and
augmentation come from a generator fixed by (seed, epoch), so a run resumed from a checkpoint at an
epoch boundary ends with exactly the weights of an uninterrupted run. Validation runs every epoch;
the epoch with the best validation GAP is kept (early stopping after `patience` epochs without one).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mumic_batch.config import TrainCfg
from mumic_batch.core.metrics import gap_at_k
from mumic_batch.model.device import autocast
from mumic_batch.model.losses import asymmetric_loss, feature_preservation, focal_loss, tempered_sigmoid_bce
from mumic_batch.model.mumic import MuMIC
from mumic_batch.model.optim import epoch_generator, param_group, random_shift, warmup_cosine

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
HEADS = ("prompt", "linear")
_EVAL_BATCH = 256

LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass
class LabelledSet:
    """Preprocessed images with their multi-hot targets, row-aligned."""

    pixels: Tensor  # [N, 3, S, S] float32 on the CPU (batches move to the device)
    targets: Tensor  # [N, C] float32, 1 for a positive pair
    mask: Tensor | None = None  # [N, C] float32, 1 for an annotated pair (None: every pair counts)


@dataclass
class FitResult:
    """The outcome of fit(); the classifier passed in now holds the best epoch's weights."""

    epochs_run: int  # epochs completed, over all (resumed) runs
    best_epoch: int  # 0-based epoch whose weights were kept
    best_val_gap: float  # validation GAP at that epoch
    stopped_early: bool  # patience ran out before cfg.epochs
    resumed_from: int | None  # epochs already done by the checkpoint this run resumed from (None: fresh start)
    val_probs: np.ndarray  # [N_val, C] validation probabilities at the best epoch
    seconds: float  # wall time of this call
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train loss, val loss, val GAP


class Classifier(nn.Module):
    """What fine-tuning optimises: a MuMIC model and its class prompts.

    head="linear" is the linear-probe baseline of the ablation: free class weights initialised from the
    prompt embeddings (times the temperature) and a per-class bias on frozen image embeddings. It has no
    prompts at prediction time, so it cannot be saved as an artifact.
    """

    def __init__(self, model: MuMIC, prompts: Sequence[str], head: str = "prompt") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.model = model
        self.register_buffer("tokens", model.tokenize(prompts), persistent=False)
        self.linear: nn.Linear | None = None
        if head == "linear":
            with torch.no_grad():
                weights = model.encode_prompts(prompts) * model.log_scale.exp()
                self.linear = nn.Linear(weights.shape[1], weights.shape[0])
                self.linear.weight.copy_(weights)
                self.linear.bias.fill_(0.0 if model.bias is None else model.bias.item())

    def class_embeddings(self) -> Tensor:
        """Unit-norm prompt embeddings [C, D] (inside the graph when the text tower trains)."""
        return F.normalize(self.model.backbone.encode_text(self.tokens).float(), dim=-1)

    def logits(self, image_emb: Tensor, class_emb: Tensor | None) -> Tensor:
        """[N, C] logits from unit-norm image embeddings."""
        if self.linear is not None:
            return self.linear(image_emb.float())
        return self.model.logits(image_emb, class_emb)


def make_loss(cfg: TrainCfg) -> LossFn:
    """The configured loss: MuMIC's tempered sigmoid BCE (optionally focused), or a baseline."""
    if cfg.loss == "tempered":
        return lambda logits, targets, mask: tempered_sigmoid_bce(logits, targets, mask, gamma=cfg.gamma)
    if cfg.loss == "focal":
        return lambda logits, targets, mask: focal_loss(logits, targets, mask)
    return lambda logits, targets, mask: asymmetric_loss(logits, targets, mask)


def image_groups(visual: nn.Module) -> list[list[str]]:
    """The image tower's parameter names in groups from input to output: stem, each block, head.

    ResNet towers: stem, layer1..layer4, attnpool; ViT towers: stem (patch embedding, class and position
    embeddings, ln_pre), each transformer block, head (ln_post, proj). Partial tuning trains the last groups.
    """
    stem, blocks, head = [], {}, []
    for name, _ in visual.named_parameters():
        parts = name.split(".")
        if parts[0] == "transformer" and len(parts) > 2:
            blocks.setdefault(".".join(parts[:3]), []).append(name)
        elif parts[0].startswith("layer") or parts[0] == "attnpool":
            blocks.setdefault(parts[0], []).append(name)
        elif parts[0] in ("ln_post", "proj", "head"):
            head.append(name)
        else:
            stem.append(name)
    return [g for g in [stem, *blocks.values(), head] if g]


def _towers(clf: Classifier, cfg: TrainCfg) -> tuple[bool, bool]:
    """Freeze what must not train; return (image trains, text trains)."""
    linear = clf.linear is not None
    image = cfg.towers in ("image", "both") and not linear
    text = cfg.towers in ("text", "both") and not linear
    backbone = clf.model.backbone
    for p in backbone.parameters():
        p.requires_grad_(False)
    groups = image_groups(backbone.visual)
    trained = {n for g in groups[max(len(groups) - cfg.image_groups, 0):] for n in g} if cfg.image_groups else None
    for name, p in backbone.visual.named_parameters():
        p.requires_grad_(image and (trained is None or name in trained))
    for name, p in backbone.named_parameters():
        if not name.startswith("visual.") and name != "logit_scale":
            p.requires_grad_(text)  # CLIP's own logit_scale stays frozen: MuMIC's log_scale replaces it
    clf.model.log_scale.requires_grad_(cfg.learn_scale and not linear)
    if clf.model.bias is not None:
        clf.model.bias.requires_grad_(not linear)
    return image, text


def _optimizer(clf: Classifier, cfg: TrainCfg) -> torch.optim.AdamW:
    """Per-tower learning rates; the temperature, bias and linear head use lr_head."""
    backbone = clf.model.backbone
    text_params = [p for n, p in backbone.named_parameters() if not n.startswith("visual.")]
    head = [clf.model.log_scale] + ([clf.model.bias] if clf.model.bias is not None else [])
    head += list(clf.linear.parameters()) if clf.linear is not None else []
    groups = param_group(backbone.visual.parameters(), cfg.lr_image, cfg.weight_decay)
    groups += param_group(text_params, cfg.lr_text, cfg.weight_decay)
    groups += param_group(head, cfg.lr_head, 0.0)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (check train.towers and train.learn_scale)")
    return torch.optim.AdamW(groups)


@dataclass
class _Frozen:
    """Embeddings of frozen towers, computed once: a frozen tower gives the same output every epoch."""

    train_images: Tensor | None = None
    val_images: Tensor | None = None
    classes: Tensor | None = None
    base_visual: nn.Module | None = None  # the base image tower, for the feature-preservation penalty


@torch.no_grad()
def embed_images(model: MuMIC, pixels: Tensor, device: torch.device, precision: str) -> Tensor:
    """Unit-norm image embeddings of a whole set in eval mode, [N, D] float32 on `device`."""
    model.eval()
    chunks = [pixels[i:i + _EVAL_BATCH].to(device) for i in range(0, pixels.shape[0], _EVAL_BATCH)]
    with autocast(device, precision):
        out = [model.encode_images(chunk).float() for chunk in chunks]
    return torch.cat(out) if out else torch.zeros((0, model.embed_dim), device=device)


def _train_mode(clf: Classifier, image_trains: bool) -> None:
    """Train mode only where it matters: BatchNorm statistics update only in image layers that train."""
    clf.eval()
    visual = clf.model.backbone.visual
    visual.train(image_trains)
    for module in visual.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()  # a frozen layer (partial tuning) keeps its BatchNorm statistics as well


def _frozen_copy(visual: nn.Module) -> nn.Module:
    """The base image tower for feature preservation: no gradients, BatchNorm statistics never updated."""
    base = copy.deepcopy(visual)
    base.requires_grad_(False)
    for module in base.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # in train mode it normalises with batch statistics, but never stores them
    return base


def _like(base: nn.Module, visual: nn.Module) -> nn.Module:
    """`base` with every module in the train/eval mode of its counterpart in `visual`.

    Batch statistics in one and running statistics in the other would make the penalty nonzero at the
    very first step, with identical weights; matched modes compare like with like.
    """
    for base_module, module in zip(base.modules(), visual.modules()):
        base_module.training = module.training
    return base


def _frozen(clf: Classifier, train: LabelledSet, val: LabelledSet, image: bool, text: bool, cfg: TrainCfg,
            device: torch.device) -> _Frozen:
    """Precompute what frozen towers produce: image embeddings of both splits, or the class embeddings."""
    frozen = _Frozen()
    if not image:
        frozen.train_images = embed_images(clf.model, train.pixels, device, cfg.precision)
        frozen.val_images = embed_images(clf.model, val.pixels, device, cfg.precision)
    if not text and clf.linear is None:
        with torch.no_grad(), autocast(device, cfg.precision):
            frozen.classes = clf.class_embeddings().float()
    return frozen


@torch.no_grad()
def predict_logits(clf: Classifier, pixels: Tensor, device: torch.device, precision: str,
                   image_emb: Tensor | None = None) -> Tensor:
    """Logits [N, C] float32 in eval mode (from `image_emb` when the image embeddings are already known)."""
    clf.eval()
    if image_emb is None:
        image_emb = embed_images(clf.model, pixels, device, precision)
    with autocast(device, precision):
        class_emb = None if clf.linear is not None else clf.class_embeddings().float()
    return clf.logits(image_emb, class_emb).float()


def predict(clf: Classifier, pixels: Tensor, device: torch.device, precision: str) -> np.ndarray:
    """Probabilities [N, C] float32 in eval mode."""
    return torch.sigmoid(predict_logits(clf, pixels, device, precision)).cpu().numpy()


def _run_epoch(clf: Classifier, data: LabelledSet, frozen: _Frozen, cfg: TrainCfg, epoch: int,
               optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: LossFn, device: torch.device) -> float:
    """One pass over the training set in the (seed, epoch) order; returns the mean training loss."""
    _train_mode(clf, frozen.train_images is None)
    gen = epoch_generator(cfg.seed, epoch)
    order = torch.randperm(data.pixels.shape[0], generator=gen)
    total, batches = 0.0, 0
    for start in range(0, order.numel(), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        with autocast(device, cfg.precision):
            if frozen.train_images is not None:
                image_emb = frozen.train_images[idx.to(device)]
            else:
                pixels = random_shift(data.pixels[idx], cfg.shift, gen).to(device)
                image_emb = clf.model.encode_images(pixels)
            fixed = frozen.classes is not None or clf.linear is not None
            class_emb = frozen.classes if fixed else clf.class_embeddings()
            if frozen.base_visual is not None:
                with torch.no_grad():
                    base_emb = F.normalize(_like(frozen.base_visual, clf.model.backbone.visual)(pixels).float(),
                                           dim=-1)
        logits = clf.logits(image_emb, class_emb).float()
        mask = None if data.mask is None else data.mask[idx].to(device)
        loss = loss_fn(logits, data.targets[idx].to(device), mask)
        if frozen.base_visual is not None:
            loss = loss + cfg.preserve * feature_preservation(image_emb, base_emb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


@dataclass
class _Progress:
    """Everything a checkpoint restores besides the model and optimiser."""

    next_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    best_val_gap: float = math.nan
    best_state: dict[str, Tensor] | None = None
    best_val_probs: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    done: bool = False
    stopped_early: bool = False


def tower_weights(model: MuMIC) -> dict[str, Tensor]:
    """A CPU copy of the towers' weights (the backbone), e.g. of the base model before fine-tuning."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.backbone.state_dict().items()}


def wise_ft(model: MuMIC, base: dict[str, Tensor], alpha: float) -> None:
    """WiSE-FT (Wortsman et al., CVPR 2022): move the towers to (1 - alpha) * base + alpha * fine-tuned.

    Interpolating the weights of a fine-tuned model with its zero-shot base keeps much of the base's
    zero-shot ability for classes the fine-tuning never saw. The learned temperature and bias stay.
    """
    with torch.no_grad():
        for name, weight in model.backbone.state_dict().items():
            if weight.is_floating_point():
                weight.copy_(torch.lerp(base[name].to(weight), weight, alpha))


def fit(clf: Classifier, train: LabelledSet, val: LabelledSet, cfg: TrainCfg, device: torch.device, *,
        checkpoint_dir: str | os.PathLike[str] | None = None, fingerprint: str = "") -> FitResult:
    """Fine-tune `clf` on `train`, validating on `val` every epoch; resume from `checkpoint_dir` when it matches."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)  # nothing here draws from the global RNG; this pins anything that might
    clf.to(device)
    image, text = _towers(clf, cfg)
    optimizer = _optimizer(clf, cfg)
    # Copied before a checkpoint is restored: the penalty pulls towards the base, not a half-trained model.
    base_visual = _frozen_copy(clf.model.backbone.visual) if cfg.preserve > 0 and image else None
    steps_per_epoch = math.ceil(train.pixels.shape[0] / cfg.batch_size)
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_steps)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    progress = _restore(ckpt, fingerprint, clf, optimizer, scheduler) if ckpt and cfg.resume else _Progress()
    resumed_from = progress.next_epoch if progress.next_epoch else None
    frozen = _frozen(clf, train, val, image, text, cfg, device)
    frozen.base_visual = base_visual
    loss_fn = make_loss(cfg)
    while not progress.done and progress.next_epoch < cfg.epochs:
        epoch = progress.next_epoch
        train_loss = _run_epoch(clf, train, frozen, cfg, epoch, optimizer, scheduler, loss_fn, device)
        _validate(clf, val, frozen, cfg, epoch, train_loss, loss_fn, device, progress)
        progress.next_epoch = epoch + 1
        if cfg.patience and epoch - progress.best_epoch >= cfg.patience:
            progress.done = progress.stopped_early = True
            log.info("early stop after epoch %d: no better validation GAP since epoch %d", epoch, progress.best_epoch)
        progress.done = progress.done or progress.next_epoch >= cfg.epochs
        if ckpt and cfg.checkpoint_every and (progress.done or progress.next_epoch % cfg.checkpoint_every == 0):
            _save(ckpt, fingerprint, clf, optimizer, scheduler, progress)
    return _finish(clf, progress, resumed_from, started)


def _validate(clf: Classifier, val: LabelledSet, frozen: _Frozen, cfg: TrainCfg, epoch: int, train_loss: float,
              loss_fn: LossFn, device: torch.device, progress: _Progress) -> None:
    """Score the validation set; snapshot the weights when its GAP improves."""
    logits = predict_logits(clf, val.pixels, device, cfg.precision, image_emb=frozen.val_images)
    probs = torch.sigmoid(logits).cpu().numpy()
    gap = gap_at_k(val.targets.numpy(), probs) if val.pixels.shape[0] else math.nan
    with torch.no_grad():
        mask = None if val.mask is None else val.mask.to(device)
        val_loss = float(loss_fn(logits, val.targets.to(device), mask))
    progress.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_gap": gap,
                             "log_scale": clf.model.log_scale.item(),
                             "bias": math.nan if clf.model.bias is None else clf.model.bias.item()})
    log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val GAP %.4f, scale %.2f", epoch + 1, cfg.epochs,
             train_loss, val_loss, gap, math.exp(progress.history[-1]["log_scale"]))
    score = gap if not math.isnan(gap) else -val_loss  # a validation split without positives falls back to loss
    if score > progress.best_score:
        progress.best_score, progress.best_epoch, progress.best_val_gap = score, epoch, gap
        progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in clf.state_dict().items()}
        progress.best_val_probs = probs


def _finish(clf: Classifier, progress: _Progress, resumed_from: int | None, started: float) -> FitResult:
    if progress.best_state is None:
        raise RuntimeError("training ran no epoch: nothing to keep (train.epochs already reached?)")
    clf.load_state_dict(progress.best_state)
    clf.eval()
    log.info("kept epoch %d (validation GAP %.4f) of %d", progress.best_epoch + 1, progress.best_val_gap,
             progress.next_epoch)
    return FitResult(
        epochs_run=progress.next_epoch, best_epoch=progress.best_epoch, best_val_gap=progress.best_val_gap,
        stopped_early=progress.stopped_early, resumed_from=resumed_from, val_probs=progress.best_val_probs,
        seconds=time.perf_counter() - started, history=progress.history,
    )


def _save(path: Path, fingerprint: str, clf: Classifier, optimizer: torch.optim.Optimizer, scheduler: Any,
          progress: _Progress) -> None:
    """Write the checkpoint to a temp file, then rename it over the previous one (never half a checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "fingerprint": fingerprint,
        "classifier": clf.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": {k: v for k, v in progress.__dict__.items() if k not in ("best_state", "best_val_probs")},
        "best_state": progress.best_state,
        "best_val_probs": torch.from_numpy(progress.best_val_probs),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    log.info("checkpoint after epoch %d: %s", progress.next_epoch, path)


def _restore(path: Path, fingerprint: str, clf: Classifier, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> _Progress:
    """Load a checkpoint of the same run (same fingerprint) into the objects; a fresh _Progress otherwise."""
    if not path.is_file():
        return _Progress()
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it belongs to another run (config, base model or data differ)", path)
        return _Progress()
    clf.load_state_dict(payload["classifier"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    progress = _Progress(**payload["progress"])
    progress.best_state = payload["best_state"]
    progress.best_val_probs = payload["best_val_probs"].numpy()
    log.info("resuming from %s after epoch %d (best so far: epoch %d)", path, progress.next_epoch,
             progress.best_epoch + 1)
    return progress
