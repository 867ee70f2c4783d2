"""The device side of the runner: host uint8 batches into the model, results back once per batch.

On CUDA: rows are copied into a ring of pinned host buffers, uploaded on a side stream with real
`non_blocking` copies (batch k+1 uploads while batch k computes), normalised on the device, and the
results come back into pinned buffers with one copy per batch; `Scored.result()` is the only wait.
JPEGs handed over as bytes are decoded in one batched `torchvision.io.decode_jpeg` call and resized
on the device. On the CPU the same code runs synchronously (pinning and streams are no-ops), which
is what the tests exercise.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from mumic_batch.core import status as st
from mumic_batch.core.preprocess import PreprocessSpec, crop_offsets, resized_size

log = logging.getLogger(__name__)


class BatchModel(Protocol):
    """What the runner needs of a model (the Predictor, or the benchmarks' null model)."""

    device: torch.device
    spec: PreprocessSpec
    embed_dim: int
    classes: Sequence

    def score_uint8(self, nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N, S, S, 3] on the device -> (probs [N, C], embeddings [N, D]) float32 on the device."""


@dataclass
class Scored:
    """A batch handed to the device; `result()` waits for it (on the CPU it is already done)."""

    probs: torch.Tensor  # host [n, C]
    emb: torch.Tensor  # host [n, D]
    order: list[int]  # batch position -> index into the rows given to submit
    failed: dict[int, st.ImageError]  # index into the rows -> why its device decode and CPU fallback failed
    cpu_ms: float  # on the CPU: the batch's compute time
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # on CUDA: (started, done) on the stream

    def result(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(probs [n, C], emb [n, D]) in the order of the rows given to submit (failed rows left out), and the
        batch's device time in ms (decode on the device, normalisation, model, copy back)."""
        ms = self.cpu_ms
        if self.events is not None:
            self.events[1].synchronize()
            ms = self.events[0].elapsed_time(self.events[1])
        inverse = np.argsort(np.asarray(self.order, dtype=np.int64), kind="stable")
        return self.probs.numpy()[inverse].copy(), self.emb.numpy()[inverse].copy(), ms


class DeviceFeeder:
    """Turns lists of prepared rows into scored batches on one model's device."""

    def __init__(self, model: BatchModel, batch_size: int, depth: int,
                 decode_cpu: Callable[[bytes], np.ndarray]) -> None:
        self.model = model
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.decode_cpu = decode_cpu
        size, n_slots = model.spec.size, depth + 1
        pin = self.cuda
        self._inputs = [torch.empty((batch_size, size, size, 3), dtype=torch.uint8, pin_memory=pin)
                        for _ in range(n_slots)]
        self._probs = [torch.empty((batch_size, len(model.classes)), dtype=torch.float32, pin_memory=pin)
                       for _ in range(n_slots)]
        self._emb = [torch.empty((batch_size, model.embed_dim), dtype=torch.float32, pin_memory=pin)
                     for _ in range(n_slots)]
        self._slot_free: list[torch.cuda.Event | None] = [None] * n_slots
        self._slot = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def submit(self, pixels: Sequence[np.ndarray | None], jpegs: Sequence[bytes | None]) -> Scored:
        """Row i is pixels[i] (uint8 [S, S, 3]) or jpegs[i] (bytes for the device decoder)."""
        started = time.perf_counter()
        slot = self._next_slot()
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda else None
        if events:
            events[0].record()
        on_device, failed, host_rows = self._decode_jpegs(pixels, jpegs)
        host = self._inputs[slot]
        host_np = host.numpy()
        for j, i in enumerate(host_rows):
            host_np[j] = pixels[i]
        order = host_rows + list(on_device)
        batch = self._upload(host[:len(host_rows)])
        if on_device:
            batch = torch.cat([batch, torch.stack(list(on_device.values()))])
        n = len(order)
        probs, emb = self._probs[slot][:n], self._emb[slot][:n]
        if n:
            dev_probs, dev_emb = self.model.score_uint8(batch)
            probs.copy_(dev_probs, non_blocking=self.cuda)
            emb.copy_(dev_emb, non_blocking=self.cuda)
        if events:
            events[1].record()
            self._slot_free[slot] = events[1]
        return Scored(probs, emb, order, failed, (time.perf_counter() - started) * 1000.0, events)

    def _next_slot(self) -> int:
        """A host slot whose previous batch has finished with its buffers."""
        slot = self._slot
        self._slot = (slot + 1) % len(self._inputs)
        if self._slot_free[slot] is not None:
            self._slot_free[slot].synchronize()
        return slot

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return host
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        on_device.record_stream(torch.cuda.current_stream(self.device))
        return on_device

    def _decode_jpegs(self, pixels: Sequence[np.ndarray | None], jpegs: Sequence[bytes | None]
                      ) -> tuple[dict[int, torch.Tensor], dict[int, st.ImageError], list[int]]:
        """Device-decode the JPEG rows; a row the device decoder refuses goes through the CPU decoder.

        Returns (row -> device uint8 [S, S, 3], row -> error of rows nothing could decode, rows on the host).
        """
        host_rows = [i for i, p in enumerate(pixels) if p is not None]
        todo = [i for i, j in enumerate(jpegs) if j is not None and pixels[i] is None]
        if not todo:
            return {}, {}, host_rows
        images = decode_jpegs([jpegs[i] for i in todo], self.device)
        on_device: dict[int, torch.Tensor] = {}
        failed: dict[int, st.ImageError] = {}
        for i, image in zip(todo, images):
            if image is not None:
                on_device[i] = resize_crop_tensor(image, self.model.spec)
                continue
            try:  # the CPU decoder gives the exact status the CPU path would have given
                on_device[i] = torch.from_numpy(self.decode_cpu(jpegs[i])).to(self.device)
            except st.ImageError as err:
                failed[i] = err
        return on_device, failed, host_rows


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3, H, W] per JPEG on `device` (None where the decoder refuses it): one batched call, then one by one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer on immutable bytes: decode_jpeg never writes
        tensors = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - one bad file fails the whole batched call; find it one by one
        pass
    out: list[torch.Tensor | None] = []
    for tensor in tensors:
        try:
            out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except Exception as err:  # noqa: BLE001 - the CPU decoder then decides the row's status
            log.debug("device decoder refused a JPEG: %r", err)
            out.append(None)
    return out


# The eval-time interpolations torch's antialiased resize reproduces ("random" is open_clip's train-time
# option, bicubic at eval).
_TORCH_INTERPOLATION = {"bicubic": "bicubic", "random": "bicubic", "bilinear": "bilinear"}


def tensor_resizable(spec: PreprocessSpec) -> bool:
    """True when resize_crop_tensor reproduces the eval transform of `spec`: Pillow's bicubic or bilinear
    filter, then a crop (the padding of resize_mode=longest stays on the Pillow path)."""
    return spec.interpolation in _TORCH_INTERPOLATION and spec.resize_mode in ("shortest", "squash")


def resize_crop_tensor(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [C, H, W] (RGB, or RGBX whose 4th channel is dropped) -> uint8 [S, S, 3]: the eval transform's
    antialiased resize (Pillow's filter) and centre crop, for a spec that tensor_resizable accepts.

    On the CPU, torch's uint8 kernel (Pillow's fixed-point arithmetic, vectorised) resizes the bytes
    directly, fastest channels-last; on other devices the filter runs in float.
    """
    height, width = image.shape[-2:]
    new_w, new_h = resized_size(width, height, spec)
    if (new_w, new_h) != (width, height):
        mode = _TORCH_INTERPOLATION[spec.interpolation]
        if image.device.type == "cpu" and image.dtype == torch.uint8:
            image = F.interpolate(image[None], size=(new_h, new_w), mode=mode, antialias=True)[0]
        else:
            resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=mode, antialias=True,
                                    align_corners=False)
            image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    left, top = crop_offsets(new_w, new_h, spec.size)
    return image[:3, top:top + spec.size, left:left + spec.size].permute(1, 2, 0)
