"""Bytes -> upright RGB PIL image, with every failure classified into a status.

Safety rules (research/reliability.md section 3): Pillow opens only the formats in
DecodeCfg.formats, so the decoders of TIFF, PSD, FITS and the rest are unreachable; the pixel
count is checked against DecodeCfg.max_pixels before any pixel is decoded; truncated files are
refused (ImageFile.LOAD_TRUNCATED_IMAGES stays False); only the first frame of an animation is
decoded. No global Pillow setting is changed. Because our own pixel check runs first and is
stricter than Pillow's warning threshold (89 MP) by default, DecompressionBombWarning never
matters; Pillow's hard error (above 2x its MAX_IMAGE_PIXELS) is classified the same way, so the
effective limit is min(max_pixels, ~179 MP).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mumic_batch.config import DecodeCfg
from mumic_batch.core.status import (
    DECODE_ERROR,
    DECOMPRESSION_BOMB,
    EMPTY,
    TRUNCATED,
    UNSUPPORTED_FORMAT,
    ImageError,
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_WHITE = (255, 255, 255, 255)  # background for transparent pixels, as img2dataset does

# Magic numbers of formats Pillow may refuse because they are not allowlisted: they let us say
# unsupported_format (a policy) rather than decode_error (bad data) without opening them.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
    (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"SIMPLE  =", "FITS"), (b"\x00\x00\x01\x00", "ICO"), (b"icns", "ICNS"), (b"qoif", "QOI"),
    (b"DDS ", "DDS"), (b"\x01\xda", "SGI"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"), (b"BLP1", "BLP"), (b"BLP2", "BLP"), (b"\xb1\x68\xde\x3a", "DCX"),
    (b"#define", "XBM"), (b"BM", "BMP"),
)
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF"}


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: mode RGB, EXIF-upright, first frame only.

    `width`/`height` are the full size after orientation, read from the header. `image` may be
    smaller when JPEG draft mode decoded it at a reduced scale (see decode_image).
    """

    image: Image.Image
    width: int
    height: int
    format: str


def decode_image(data: bytes, cfg: DecodeCfg, target_size: int | None = None) -> DecodedImage:
    """Decode `data`; raises ImageError with a decode status.

    With `target_size` and `cfg.draft`, JPEGs are decoded by libjpeg's DCT scaling at the
    smallest 1/2, 1/4 or 1/8 scale that keeps both sides >= 2 * target_size: the later resize to
    target_size still starts from twice the pixels it keeps, so quality stays close to a full
    decode while decode time drops several-fold for large photos.
    """
    if not data:
        raise ImageError(EMPTY, "zero bytes")
    try:
        return _decode(data, cfg, target_size)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow plugins raise OSError, ValueError, SyntaxError, ...
        raise _classify(err, data, cfg) from err


def _decode(data: bytes, cfg: DecodeCfg, target_size: int | None) -> DecodedImage:
    im = Image.open(io.BytesIO(data), formats=list(cfg.formats))
    fmt = str(im.format)
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError(DECODE_ERROR, f"invalid size {width}x{height}")
    if width * height > cfg.max_pixels:
        raise ImageError(DECOMPRESSION_BOMB, f"{width}x{height} exceeds max_pixels {cfg.max_pixels}")
    if target_size and cfg.draft and fmt in _DRAFT_FORMATS:
        im.draft("RGB", (2 * target_size, 2 * target_size))
    im.load()  # first frame only: nothing here ever seeks
    orientation = _orientation(im)
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return DecodedImage(to_rgb(im), width, height, fmt)


def _orientation(im: Image.Image) -> int:
    # A broken EXIF block should not cost the image: treat it as upright.
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - EXIF parsing raises assorted errors on junk
        return 1


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha over white, 16-bit/float scaled to 8 bits, CMYK converted."""
    mode = im.mode
    if mode in _HIGH_BIT_MODES:
        return Image.fromarray(_to_uint8(im)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:  # tRNS / GIF transparent index too
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode == "RGB":
        return im
    try:
        return im.convert("RGB")  # 1, L, P, CMYK (Adobe inversion handled by the JPEG decoder), YCbCr
    except ValueError as err:
        raise ImageError(UNSUPPORTED_FORMAT, f"cannot convert mode {mode} to RGB") from err


def _to_uint8(im: Image.Image) -> np.ndarray:
    """16-bit and 32-bit integer samples by the 16-bit range; float samples by [0, 1]."""
    arr = np.asarray(im)
    if im.mode == "F":
        unit = np.clip(np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        return np.floor(unit * 255.0 + 0.5).astype(np.uint8)
    # Rounded 65535 -> 255 mapping; 'I' images come from 16-bit sources, so clip to that range.
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def sniff_format(data: bytes) -> str | None:
    """Pillow's name for the format whose magic number starts `data`, if one is known."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12])
    if len(data) > 2 and data[0] == 0x0A and data[1] in (0, 2, 3, 4, 5) and data[2] == 1:
        return "PCX"
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PPM"
    return None


def _classify(err: Exception, data: bytes, cfg: DecodeCfg) -> ImageError:
    """Turn whatever Pillow raised into a status."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, (Image.DecompressionBombError, MemoryError)):
        return ImageError(DECOMPRESSION_BOMB, text)
    if isinstance(err, UnidentifiedImageError):
        return _unidentified(data, cfg)
    lowered = str(err).lower()
    if isinstance(err, ValueError) and ("too large" in lowered or "too much memory" in lowered):
        return ImageError(DECOMPRESSION_BOMB, text)  # PNG text-chunk limits (Pillow #9814)
    if isinstance(err, OSError) and "truncated" in lowered:
        return ImageError(TRUNCATED, text)
    return ImageError(DECODE_ERROR, text)


def _unidentified(data: bytes, cfg: DecodeCfg) -> ImageError:
    sniffed = sniff_format(data)
    if sniffed is not None and sniffed not in cfg.formats:
        return ImageError(UNSUPPORTED_FORMAT, f"{sniffed} is not in decode.formats {list(cfg.formats)}")
    if sniffed is not None:
        return ImageError(DECODE_ERROR, f"looks like {sniffed} but cannot be read")
    head = data[:64].lstrip().lower()
    hint = " (looks like HTML/XML text)" if head.startswith(b"<") else ""
    return ImageError(DECODE_ERROR, f"not a recognised image{hint}")
