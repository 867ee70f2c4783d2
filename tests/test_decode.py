"""decode_image: statuses for hostile files, mode rules, orientation, first frame, draft mode."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile

from mumic_batch.config import DecodeCfg
from mumic_batch.core import status
from mumic_batch.core.decode import DecodedImage, decode_image, sniff_format
from tests.fixtures.net import make_jpeg

CFG = DecodeCfg()


def _decode(path: Path, cfg: DecodeCfg = CFG, target: int | None = None) -> DecodedImage:
    return decode_image(path.read_bytes(), cfg, target)


def _status(path: Path, cfg: DecodeCfg = CFG) -> str:
    with pytest.raises(status.ImageError) as info:
        _decode(path, cfg)
    return info.value.status


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("zero_byte", status.EMPTY),
        ("truncated_jpeg", status.TRUNCATED),
        ("truncated_png", status.TRUNCATED),
        ("random_bytes", status.DECODE_ERROR),
        ("html_as_jpg", status.DECODE_ERROR),
        ("tiff", status.UNSUPPORTED_FORMAT),
        ("bomb_png", status.DECOMPRESSION_BOMB),
        ("large_png", status.DECOMPRESSION_BOMB),
        ("text_bomb_png", status.DECOMPRESSION_BOMB),
    ],
)
def test_hostile_files_get_specific_status(hostile_images: dict[str, Path], name: str, expected: str) -> None:
    assert _status(hostile_images[name]) == expected


def test_truncated_images_stay_refused_globally() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bombs_are_refused_before_any_pixel_is_decoded(
    hostile_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.format) or real_load(self))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("bomb_png", "large_png"):
        assert _status(hostile_images[name]) == status.DECOMPRESSION_BOMB
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert loads == []
    assert grown_kib < 100 * 1024  # a loaded 80-900 MP image would need 80-900 MB


def test_max_pixels_is_configurable(hostile_images: dict[str, Path]) -> None:
    jpeg = hostile_images["jpeg"]  # 640 x 480
    assert _status(jpeg, DecodeCfg(max_pixels=640 * 480 - 1)) == status.DECOMPRESSION_BOMB
    assert _decode(jpeg, DecodeCfg(max_pixels=640 * 480)).width == 640


def test_allowlist_decides_unsupported_versus_ok(hostile_images: dict[str, Path]) -> None:
    tiff = _decode(hostile_images["tiff"], DecodeCfg(formats=("TIFF",)))
    assert (tiff.format, tiff.image.mode, tiff.image.size) == ("TIFF", "RGB", (32, 32))
    assert _status(hostile_images["jpeg"], DecodeCfg(formats=("PNG",))) == status.UNSUPPORTED_FORMAT


def test_plain_formats_decode(hostile_images: dict[str, Path]) -> None:
    for name, fmt, size in (("jpeg", "JPEG", (640, 480)), ("png", "PNG", (64, 48)), ("webp", "WEBP", (40, 30))):
        out = _decode(hostile_images[name])
        assert (out.format, out.image.mode, out.image.size, (out.width, out.height)) == (fmt, "RGB", size, size)


def test_cmyk_becomes_rgb(hostile_images: dict[str, Path]) -> None:
    out = _decode(hostile_images["cmyk_jpeg"])
    assert out.image.mode == "RGB"
    assert np.allclose(out.image.getpixel((32, 24)), (255, 0, 0), atol=8)  # CMYK (0,255,255,0) is red


@pytest.mark.parametrize("name", ["palette_png", "la_png", "rgba_png"])
def test_transparent_pixels_composite_on_white(hostile_images: dict[str, Path], name: str) -> None:
    out = _decode(hostile_images[name])
    assert out.image.mode == "RGB" and out.image.size == (32, 16)
    assert out.image.getpixel((2, 8)) == (255, 255, 255)  # left half is fully transparent
    right = {"palette_png": (255, 0, 0), "la_png": (0, 0, 0), "rgba_png": (0, 0, 255)}[name]
    assert out.image.getpixel((30, 8)) == right


def test_16_bit_is_scaled_to_8_bit(hostile_images: dict[str, Path]) -> None:
    out = _decode(hostile_images["png16"])
    row = np.asarray(out.image)[0, :, 0]
    assert out.image.mode == "RGB"
    assert np.array_equal(row, np.arange(256))  # column c held c * 257


@pytest.mark.parametrize(("mode", "values", "expected"), [("I", [-5, 0, 65535, 70000], [0, 0, 255, 255]),
                                                          ("F", [-1.0, 0.5, 1.0, float("nan")], [0, 128, 255, 0])])
def test_wide_modes_scale_deterministically(mode: str, values: list[float], expected: list[int]) -> None:
    from mumic_batch.core.decode import to_rgb

    dtype = np.int32 if mode == "I" else np.float32
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    assert list(np.asarray(to_rgb(image))[0, :, 0]) == expected


def test_bilevel_becomes_rgb(hostile_images: dict[str, Path]) -> None:
    out = _decode(hostile_images["bilevel_bmp"])
    assert out.image.mode == "RGB"
    assert (out.image.getpixel((2, 2)), out.image.getpixel((30, 2))) == ((0, 0, 0), (255, 255, 255))


def test_exif_orientation_is_applied(hostile_images: dict[str, Path]) -> None:
    out = _decode(hostile_images["exif_rotated_jpeg"])
    assert out.image.size == (32, 64) and (out.width, out.height) == (32, 64)  # stored as 64 x 32
    top, bottom = np.asarray(out.image)[8, 16], np.asarray(out.image)[56, 16]
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue below


def test_animation_decodes_first_frame_only(hostile_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    seeks: list[int] = []
    real_seek = GifImagePlugin.GifImageFile.seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", lambda self, f: seeks.append(f) or real_seek(self, f))
    out = _decode(hostile_images["animated_gif"])
    assert out.image.mode == "RGB" and out.image.size == (32, 32)
    assert out.image.getpixel((16, 16)) == (255, 0, 0)
    assert [f for f in seeks if f > 0] == []


def test_draft_decodes_large_jpeg_smaller_but_reports_full_size() -> None:
    data = make_jpeg(2000, 1500)
    full = decode_image(data, DecodeCfg(draft=False), target_size=224)
    drafted = decode_image(data, CFG, target_size=224)
    assert full.image.size == (2000, 1500)
    assert drafted.image.size == (1000, 750)  # 1/2 scale: 1/4 would leave a side under 2 * 224
    assert (drafted.width, drafted.height) == (2000, 1500)
    assert decode_image(data, CFG).image.size == (2000, 1500)  # no target: no draft


def test_sniffing_names_common_magic_numbers() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_format(b"\0\0\0\x18ftypheic") == "HEIF"
    assert sniff_format(b"8BPS\0\1") == "PSD"
    assert sniff_format(b"<html>") is None


def test_unexpected_exceptions_are_classified(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_load(self: ImageFile.ImageFile) -> None:
        raise SyntaxError("plugin parsing bug")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(status.ImageError) as info:
        decode_image(make_jpeg(16, 16), CFG)
    assert info.value.status == status.DECODE_ERROR and "SyntaxError" in info.value.message


def test_output_mode_is_always_rgb(hostile_images: dict[str, Path]) -> None:
    ok = ["jpeg", "png", "webp", "cmyk_jpeg", "palette_png", "la_png", "rgba_png", "png16", "bilevel_bmp",
          "animated_gif", "exif_rotated_jpeg"]
    for name in ok:
        image = _decode(hostile_images[name], target=224).image
        assert image.mode == "RGB", name
