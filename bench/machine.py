"""What machine a benchmark ran on: every bench/ script names it next to its table."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_line() -> str:
    """One line: CPU model, cores this process may use, RAM, GPU, torch version."""
    import torch

    return (f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores, {ram_gib()} GiB RAM, "
            f"GPU: {gpu_name() or 'none'}, torch {torch.__version__}, Python {platform.python_version()}")
