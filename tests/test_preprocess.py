"""preprocess: same numbers as open_clip's eval transform, without torch in core."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mumic_batch.config import DecodeCfg
from mumic_batch.core.decode import decode_image
from mumic_batch.core.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessSpec, preprocess
from tests.fixtures.net import make_jpeg

# Both sides resize with Pillow (torchvision's Resize hands PIL images to Image.resize) and do
# the same float32 arithmetic, so the outputs agree exactly; measured max |diff| was 0.0.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photograph: scikit-learn's bundled china.jpg (640 x 427), decoded by our decoder."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-learn (which ships the sample photo) is not installed")
    path = Path(spec.origin).parent / "datasets" / "images" / "china.jpg"
    return decode_image(path.read_bytes(), DecodeCfg()).image


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize(("size", "interpolation"), [(224, "bicubic"), (97, "bilinear"), (64, "random")])
@pytest.mark.parametrize("shape", ["landscape", "portrait", "small"])
def test_matches_open_clip_eval_transform(
    photo: Image.Image, resize_mode: str, size: int, interpolation: str, shape: str
) -> None:
    open_clip = pytest.importorskip("open_clip")
    image = {"landscape": photo, "portrait": photo.transpose(Image.Transpose.ROTATE_90),
             "small": photo.resize((100, 60))}[shape]  # small: upsampled, and padded for "longest"
    reference = open_clip.image_transform(
        size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode=resize_mode, interpolation=interpolation
    )(image).numpy()
    ours = preprocess(image, PreprocessSpec(size, OPENAI_MEAN, OPENAI_STD, interpolation, resize_mode))
    assert ours.shape == reference.shape == (3, size, size)
    assert ours.dtype == np.float32
    assert float(np.abs(ours - reference).max()) <= TOLERANCE


def test_defaults_match_open_clip_constants() -> None:
    constants = pytest.importorskip("open_clip.constants")
    spec = PreprocessSpec.from_open_clip_defaults(224)
    assert spec.mean == constants.OPENAI_DATASET_MEAN and spec.std == constants.OPENAI_DATASET_STD
    assert (spec.size, spec.interpolation, spec.resize_mode) == (224, "bicubic", "shortest")


def test_writes_into_a_batch_row(photo: Image.Image) -> None:
    spec = PreprocessSpec.from_open_clip_defaults(64)
    batch = np.zeros((2, 3, 64, 64), dtype=np.float32)
    returned = preprocess(photo, spec, out=batch[1])
    assert returned is batch[1] or np.shares_memory(returned, batch)
    assert np.array_equal(batch[1], preprocess(photo, spec)) and not batch[0].any()


def test_non_rgb_input_is_converted() -> None:
    gray = Image.new("L", (50, 40), 128)
    out = preprocess(gray, PreprocessSpec.from_open_clip_defaults(32))
    expected = (np.float32(128) / np.float32(255) - np.float32(OPENAI_MEAN[0])) / np.float32(OPENAI_STD[0])
    assert out.shape == (3, 32, 32) and np.allclose(out[0], expected)


def test_draft_decode_stays_close_to_full_decode() -> None:
    # Draft decoding (libjpeg DCT scaling to >= 2x the target) trades exactness for speed;
    # on a 1200x900 photo-like JPEG the change after preprocessing stays small.
    data = make_jpeg(1200, 900, seed=3)
    spec = PreprocessSpec.from_open_clip_defaults(224)
    full = preprocess(decode_image(data, DecodeCfg(draft=False), 224).image, spec)
    drafted = preprocess(decode_image(data, DecodeCfg(draft=True), 224).image, spec)
    assert float(np.abs(full - drafted).mean()) < 0.02


@pytest.mark.parametrize("bad", [dict(size=0), dict(interpolation="area"), dict(resize_mode="crop"),
                                 dict(std=(1.0, 0.0, 1.0))])
def test_invalid_specs_are_refused(bad: dict[str, object]) -> None:
    args: dict[str, object] = dict(size=8, mean=OPENAI_MEAN, std=OPENAI_STD) | bad
    with pytest.raises(ValueError):
        PreprocessSpec(**args)  # type: ignore[arg-type]
