"""Contrastive image-caption pretraining with open_clip's CLIP loss: the offline stand-in for a pretrained CLIP.

These machines cannot download CLIP weights, so the demo and the tests pretrain a small open_clip model on
the sample catalogue's captions. It learns what the captions name (colours, backgrounds, counts, some digit
shapes) well enough that zero-shot prompts and transfer learning mean something. Production starts from
real pretrained weights instead (train.clip_weights or a base artifact built from them).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from mumic_batch.config import PretrainCfg
from mumic_batch.model.device import autocast
from mumic_batch.model.mumic import MuMIC
from mumic_batch.model.optim import epoch_generator, param_group, random_shift, warmup_cosine

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: a temperature below 1/100 makes training unstable


@dataclass
class PretrainResult:
    """How pretraining went; the model passed in now holds the kept step's weights."""

    steps: int  # steps run
    kept_step: int  # step whose weights were kept (lowest validation loss, or the last step)
    val_loss: float | None  # validation contrastive loss at the kept step
    seconds: float  # wall time
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per validation


@dataclass
class PairSet:
    """Images and their tokenised captions, row-aligned."""

    pixels: Tensor  # [N, 3, S, S] float32 (kept on the CPU; batches move to the device)
    tokens: Tensor  # [N, context_length] int64


def _encode(model: MuMIC, pixels: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-norm image and caption embeddings in float32."""
    image = F.normalize(model.backbone.encode_image(pixels).float(), dim=-1)
    text = F.normalize(model.backbone.encode_text(tokens).float(), dim=-1)
    return image, text


@torch.no_grad()
def validation_loss(model: MuMIC, pairs: PairSet, device: torch.device, precision: str) -> float:
    """CLIP loss over the whole validation set at once: every other pair is a negative."""
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        image, text = _encode(model, pairs.pixels.to(device), pairs.tokens.to(device))
    model.train(was_training)
    return float(ClipLoss()(image, text, model.backbone.logit_scale.exp().float()))


def pretrain(model: MuMIC, train: PairSet, val: PairSet | None, cfg: PretrainCfg, device: torch.device) -> PretrainResult:
    """Train both towers with the CLIP loss; keep the step with the lowest validation loss (or the last)."""
    started = time.perf_counter()
    model.to(device).train()
    backbone = model.backbone
    optimizer = torch.optim.AdamW(param_group(backbone.parameters(), cfg.lr, cfg.weight_decay))
    scheduler = warmup_cosine(optimizer, cfg.steps, cfg.warmup_steps)
    loss_fn = ClipLoss()
    batch = min(cfg.batch_size, train.pixels.shape[0])
    best = (math.inf, 0, None)
    history: list[dict[str, float]] = []
    step, epoch = 0, 0
    while step < cfg.steps:
        gen = epoch_generator(cfg.seed, epoch)
        order = torch.randperm(train.pixels.shape[0], generator=gen)
        for start in range(0, order.numel() - batch + 1, batch):  # full batches: the loss needs negatives
            idx = order[start:start + batch]
            pixels = random_shift(train.pixels[idx], cfg.shift, gen).to(device)
            with autocast(device, cfg.precision):
                image, text = _encode(model, pixels, train.tokens[idx].to(device))
            loss = loss_fn(image, text, backbone.logit_scale.exp().float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                backbone.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            step += 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                best = _validate(model, val, cfg, device, step, loss.item(), best, history)
            if step >= cfg.steps:
                break
        epoch += 1
    return _finish(model, best, step, history, started)


def _validate(model: MuMIC, val: PairSet | None, cfg: PretrainCfg, device: torch.device, step: int, loss: float,
              best: tuple, history: list[dict[str, float]]) -> tuple:
    """Log progress; snapshot the weights when the validation loss improves (or always, without a val set)."""
    val_loss = validation_loss(model, val, device, cfg.precision) if val is not None else None
    history.append({"step": step, "train_loss": loss, "val_loss": val_loss if val_loss is not None else math.nan,
                    "logit_scale": model.backbone.logit_scale.exp().item()})
    log.info("pretrain step %d/%d: train loss %.3f, val loss %s, logit scale %.1f", step, cfg.steps, loss,
             "-" if val_loss is None else f"{val_loss:.3f}", history[-1]["logit_scale"])
    score = val_loss if val_loss is not None else -step  # no val set: the latest step wins
    if score < best[0]:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return (score, step, state)
    return best


def _finish(model: MuMIC, best: tuple, steps: int, history: list[dict[str, float]], started: float) -> PretrainResult:
    """Load the kept weights and carry CLIP's learned logit scale over to MuMIC's temperature."""
    score, kept_step, state = best
    if state is not None:
        model.load_state_dict(state)
    with torch.no_grad():
        model.log_scale.copy_(model.backbone.logit_scale.detach().reshape(()))
    model.eval()
    val_loss = None if not history or math.isnan(history[-1]["val_loss"]) else score
    log.info("pretraining kept step %d of %d (val loss %s, log scale %.3f)", kept_step, steps,
             "-" if val_loss is None else f"{val_loss:.3f}", model.log_scale.item())
    return PretrainResult(steps=steps, kept_step=kept_step, val_loss=val_loss,
                          seconds=time.perf_counter() - started, history=history)
