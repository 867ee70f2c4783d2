"""One row before the model: fetch, decode and resize to uint8, with every failure turned into a status.

Runs on the runner's threads. The CPU path decodes with Pillow and resizes to the model's input
size in uint8 (normalisation happens on the device). The resize runs in torch's uint8 kernel on the
decoded image's own memory where it reproduces the eval transform (bicubic or bilinear, no
padding): Pillow's bytes within 1-2 levels on <1% of values, and decode + resize in 1.75x less CPU
time than with Pillow's resize (docs/benchmarks.md); other specs resize with Pillow. With `gpu_jpeg`, a JPEG whose header passes
the same checks (format allowlist, pixel cap, RGB or grey, upright) is handed over as bytes for a
batched device decode; everything else takes the CPU path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import ExifTags, Image

from mumic_batch.config import DecodeCfg
from mumic_batch.core import status as st
from mumic_batch.core.decode import decode_image
from mumic_batch.core.preprocess import PreprocessSpec, resize_crop
from mumic_batch.inference.device import resize_crop_tensor, tensor_resizable
from mumic_batch.io.fetch import Fetcher

log = logging.getLogger(__name__)

_DEVICE_JPEG_MODES = frozenset({"RGB", "L"})
# image_tensor's views of Pillow's memory are read-only to numpy; nothing ever writes through them
# (resize reads its input), and torch would otherwise warn once per worker process.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


@dataclass(slots=True)
class Prepared:
    """One row after fetch and decode: `pixels` (uint8 [S, S, 3]) or `jpeg` (bytes to decode on the device) when ok."""

    status: str
    error: str | None = None
    pixels: np.ndarray | None = None
    jpeg: bytes | None = None
    content_sha256: str | None = None
    width: int = 0
    height: int = 0
    fetch_ms: float = 0.0
    decode_ms: float = 0.0


class Preparer:
    """Fetch + decode + resize for one model's input spec; thread-safe, CPU decodes capped at `decode_workers`."""

    def __init__(self, fetcher: Fetcher, decode_cfg: DecodeCfg, spec: PreprocessSpec, decode_workers: int,
                 gpu_jpeg: bool = False) -> None:
        self.fetcher = fetcher
        self.decode_cfg = decode_cfg
        self.spec = spec
        self.tensor_resize = tensor_resizable(spec)
        self.gpu_jpeg = gpu_jpeg and self.tensor_resize and "JPEG" in decode_cfg.formats
        # Fetch threads outnumber cores (they wait on the network); this keeps decodes to the cores.
        self._decode_slots = threading.BoundedSemaphore(decode_workers)

    def prepare(self, uri: str | None) -> Prepared:
        """Never raises: a failure is a Prepared with its status and message."""
        started = time.perf_counter()
        fetched = None
        try:
            if not uri:
                raise st.ImageError(st.BAD_URI, "empty uri")
            data = self.fetcher.fetch(uri)
            fetched = time.perf_counter()
            sha = hashlib.sha256(data).hexdigest()
            size = self._device_jpeg_size(data) if self.gpu_jpeg else None
            if size is not None:
                return Prepared(st.OK, jpeg=data, content_sha256=sha, width=size[0], height=size[1],
                                fetch_ms=_ms(started, fetched), decode_ms=_ms(fetched))
            pixels, width, height = self.decode_cpu(data)
        except st.ImageError as err:
            return _failed(err.status, err.message, started, fetched)
        except Exception as err:  # noqa: BLE001 - per-row code must never drop or fail a row
            log.warning("internal error on %s: %r", uri, err)
            return _failed(st.INTERNAL_ERROR, f"{type(err).__name__}: {err}", started, fetched)
        return Prepared(st.OK, pixels=pixels, content_sha256=sha, width=width, height=height,
                        fetch_ms=_ms(started, fetched), decode_ms=_ms(fetched))

    def decode_cpu(self, data: bytes) -> tuple[np.ndarray, int, int]:
        """Pillow decode + resize to uint8 [S, S, 3]; raises ImageError with the decode status."""
        with self._decode_slots:
            decoded = decode_image(data, self.decode_cfg, target_size=self.spec.size)
            if self.tensor_resize:
                # Made contiguous here, on a decode thread (numpy's copy releases the GIL and, unlike
                # torch's, never wakes a thread pool): the model thread copies the rows into its batch,
                # and a strided (RGBX) source would cost it 0.2-0.3 ms per row.
                pixels = np.ascontiguousarray(resize_crop_tensor(image_tensor(decoded.image), self.spec).numpy())
            else:
                pixels = resize_crop(decoded.image, self.spec)
            return pixels, decoded.width, decoded.height

    def _device_jpeg_size(self, data: bytes) -> tuple[int, int] | None:
        """(width, height) when the device decoder may take this file, else None (the CPU path decides)."""
        # No end-of-image marker: likely truncated, and a device decoder may not say so; Pillow will.
        if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
            return None
        try:
            im = Image.open(io.BytesIO(data), formats=["JPEG"])  # header only, no pixels
            width, height = im.size
            upright = im.getexif().get(ExifTags.Base.Orientation, 1) in (1, None)
        except Exception:  # noqa: BLE001 - a header Pillow cannot read: the CPU path gives its status
            return None
        if im.mode not in _DEVICE_JPEG_MODES or not upright or not 0 < width * height <= self.decode_cfg.max_pixels:
            return None
        return width, height


def image_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 [4, H, W] channels-last view of an RGB image's own memory (Pillow stores RGB as RGBX),
    through Pillow's Arrow export; a copy [3, H, W] of an image Pillow allocated in several blocks."""
    try:
        exported = pa.array(image)
    except ValueError:  # "rows are not contiguous": an image larger than Pillow's allocation block
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)
    pixels = exported.values
    flat = np.frombuffer(pixels.buffers()[1], dtype=np.uint8, count=image.width * image.height * 4,
                         offset=pixels.offset)
    return torch.from_numpy(flat).view(image.height, image.width, 4).permute(2, 0, 1)


def _failed(status: str, error: str, started: float, fetched: float | None) -> Prepared:
    if fetched is None:
        return Prepared(status, error, fetch_ms=_ms(started))
    return Prepared(status, error, fetch_ms=_ms(started, fetched), decode_ms=_ms(fetched))


def _ms(since: float, until: float | None = None) -> float:
    return ((until if until is not None else time.perf_counter()) - since) * 1000.0
