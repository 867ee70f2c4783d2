"""Devices and mixed precision, one definition for training and inference."""

from __future__ import annotations

import contextlib

import torch

from mumic_batch.config import DEVICES, PRECISIONS


def resolve_device(device: str, index: int | None = None) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a CUDA device is an error, not a silent CPU run.

    `index` picks the GPU for a bare 'auto'/'cuda' (see spread_index); an explicit 'cuda:N' wins.
    """
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} or cuda:N, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                           "set infer.device=cpu or run on a GPU node")
    if device.startswith("cuda:"):
        return torch.device(device)
    return torch.device("cuda", (index or 0) % torch.cuda.device_count())


def spread_index(worker: int, gpus: int) -> int:
    """The GPU for the `worker`-th Python worker when Spark assigns none: round-robin over the visible GPUs."""
    return worker % gpus if gpus > 0 else 0


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (an H100 runs a ViT several times faster than in fp32), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA with precision='bf16'; a no-op otherwise (CPU stays fp32 and exact)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
