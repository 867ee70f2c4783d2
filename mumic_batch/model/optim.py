"""Pieces shared by pretraining and fine-tuning: parameter groups, schedule, augmentation."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def param_group(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only; gains, biases and scalars (temperature, bias) never decay."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's lr over `warmup_steps`, then cosine decay to zero at `total_steps`."""
    total = max(total_steps, 1)
    warmup = min(warmup_steps, total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def random_shift(pixels: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to `max_shift` pixels (edge-replicated); no flips or crops that change labels."""
    if max_shift <= 0:
        return pixels
    n, _, height, width = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)])


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator fixed by (seed, epoch): batch order and augmentation replay exactly after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
