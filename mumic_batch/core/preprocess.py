"""RGB PIL image -> normalised float32 CHW array, reproducing open_clip's eval transform.

open_clip's `image_transform(size, is_train=False)` is torchvision Resize (which, for PIL
input, is Pillow's own resize), CenterCrop (or CenterCropOrPad), ToTensor and Normalize. Doing
the same steps here with Pillow and numpy gives the same numbers without importing torch, so
preprocessing can run in fetch/decode threads of a Spark worker (tests/test_preprocess.py
compares the two on a real photo).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# open_clip.constants.OPENAI_DATASET_MEAN / _STD (copied: core never imports open_clip).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "random": Image.Resampling.BICUBIC,  # open_clip's train-time option; its eval transform uses bicubic
}
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class PreprocessSpec:
    """The eval transform of one model: output size, normalisation and resize rule."""

    size: int  # output is [3, size, size]
    mean: tuple[float, float, float]  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float]  # per-channel divisor after the mean
    interpolation: str = "bicubic"  # one of INTERPOLATIONS
    resize_mode: str = "shortest"  # shortest: resize + center crop; longest: fit + pad; squash: stretch
    fill_color: int = 0  # padding value (0-255) for resize_mode="longest", as open_clip's fill_color

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"PreprocessSpec.size must be >= 1, got {self.size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError("mean and std need three values each, std non-zero")

    @classmethod
    def from_open_clip_defaults(cls, size: int) -> PreprocessSpec:
        """open_clip's default eval transform at `size` (OpenAI mean/std, bicubic, shortest)."""
        return cls(size=size, mean=OPENAI_MEAN, std=OPENAI_STD)


def preprocess(image: Image.Image, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """float32 array [3, size, size]; written into `out` (e.g. a row of a batch) when given."""
    chw = normalise(resize_crop(image, spec), spec).transpose(2, 0, 1)
    if out is None:
        return np.ascontiguousarray(chw)
    out[...] = chw
    return out


def resize_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """uint8 array [size, size, 3] (HWC): the geometric half of the eval transform, before normalisation.

    The inference runner ships these bytes to the device and normalises there (a quarter of the
    bytes of float32, and no float work on the CPU).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = _resize(image, spec)
    if spec.resize_mode != "squash":
        image = _center_crop_or_pad(image, spec.size, spec.fill_color)
    return np.asarray(image, dtype=np.uint8)


def normalise(hwc: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [..., 3] -> float32 with ToTensor (/255) and Normalize (-mean, /std), same operations in the same order."""
    scaled = hwc.astype(np.float32) / np.float32(255.0)
    return (scaled - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)


def resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) after the resize step of the eval transform (before the crop or pad)."""
    if spec.resize_mode == "shortest":
        # torchvision's rule for Resize(int): the short side becomes `size`, the long side is
        # truncated (int()), not rounded.
        short, long = min(width, height), max(width, height)
        new_short, new_long = spec.size, int(spec.size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    if spec.resize_mode == "longest":
        # open_clip ResizeKeepRatio(longest=1): scale by the larger ratio, round each side.
        ratio = max(height / spec.size, width / spec.size)
        return round(width / ratio), round(height / ratio)
    return spec.size, spec.size


def crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the centre crop of a `size` square from an image at least that large."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def _resize(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    new = resized_size(*image.size, spec)
    if new == image.size:  # torchvision skips the resize in this case too
        return image
    return image.resize(new, INTERPOLATIONS[spec.interpolation])


def _center_crop_or_pad(image: Image.Image, size: int, fill: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        pad_left = (size - width) // 2 if size > width else 0
        pad_top = (size - height) // 2 if size > height else 0
        canvas = Image.new("RGB", (max(width, size), max(height, size)), (fill, fill, fill))
        canvas.paste(image, (pad_left, pad_top))
        image = canvas
        width, height = image.size
    left, top = crop_offsets(width, height, size)
    if (left, top, width, height) == (0, 0, size, size):
        return image
    return image.crop((left, top, left + size, top + size))
