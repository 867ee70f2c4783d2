"""Seeded sample catalogue: handwritten digits composed on textured canvases, with multi-label truth.

Images are real UCI handwritten digit glyphs (bundled with scikit-learn) upscaled, coloured, rotated
and placed on a background; the labels are the digits present, their colours, the background kind
and the digit count. Class frequencies are deliberately skewed (a few majority classes, a long
tail). Everything is drawn from `numpy.random.SeedSequence(cfg.seed)` sub-streams, so one seed
gives byte-identical JPEG files and identical frames; image i does not depend on `n_images`.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from mumic_batch.config import SampleCfg
from mumic_batch.core.ids import image_id_for

log = logging.getLogger(__name__)
K = TypeVar("K")


@dataclass(frozen=True)
class ClassSpec:
    name: str  # label as stored in the tables, e.g. "digit_3", "red", "striped_background"
    prompt: str  # text prompt whose embedding is this class's classifier weight
    group: str  # "digit" | "colour" | "background" | "count"
    zero_shot_holdout: bool  # True: left out of fine-tuning, predicted zero-shot from its prompt


@dataclass(frozen=True)
class SampleCatalogue:
    image_dir: Path
    catalogue: pd.DataFrame  # image_id, uri, updated_at
    labels: pd.DataFrame  # image_id, uri, labels, clean_labels, split, caption


# Sampling weights per group; they set the imbalance (majority classes first, then the tail).
DIGIT_WEIGHTS = {1: 0.20, 7: 0.16, 3: 0.13, 0: 0.11, 5: 0.10, 2: 0.08, 8: 0.07, 4: 0.06, 6: 0.05, 9: 0.04}
COLOUR_WEIGHTS = {"black": 0.40, "blue": 0.20, "red": 0.15, "purple": 0.13, "green": 0.08, "orange": 0.04}
COLOUR_RGB = {  # saturated or dark, so every colour stands out on the light backgrounds
    "black": (25, 25, 25),
    "blue": (30, 70, 210),
    "red": (205, 30, 35),
    "purple": (125, 35, 165),
    "green": (25, 140, 45),
    "orange": (245, 125, 0),
}
BACKGROUNDS = {"plain": 0.38, "gradient": 0.27, "striped": 0.18, "checkered": 0.11, "dotted": 0.06}
COUNTS = {1: 0.45, 2: 0.33, 3: 0.14, 4: 0.08}  # digits per image; 3 and 4 share the class many_digits
COUNT_CLASSES = {1: "single_digit", 2: "two_digits", 3: "many_digits", 4: "many_digits"}
HOLDOUTS = frozenset({"purple", "striped_background"})  # visually clear, and always named in captions

# SeedSequence spawn keys: one independent stream per purpose, one per image.
_SPLIT_KEY, _NOISE_KEY, _TIME_KEY, _IMAGE_KEY = 0, 1, 2, 3
_EPOCH = pd.Timestamp("2024-01-01", tz="UTC")  # updated_at lies in the 30 days after this
_FILE_NAME = re.compile(r"\d{6}\.jpg")  # images/000000.jpg, ...: the generator's own files
_JPEG_QUALITY = 85
_GLYPH_PAD = 2  # blank pixels around each 8x8 glyph before upscaling
_GRAIN_SIGMA = 4.0  # luminance grain: real-photo-like entropy, so a 640x480 JPEG is a few tens of KB


def _build_classes() -> tuple[ClassSpec, ...]:
    """The fixed class list: digits, colours, backgrounds, counts."""
    specs = [ClassSpec(f"digit_{d}", f"a photo with the digit {d}", "digit", False) for d in range(10)]
    specs += [ClassSpec(c, f"a photo with a {c} digit", "colour", c in HOLDOUTS) for c in COLOUR_WEIGHTS]
    for bg in BACKGROUNDS:
        name = f"{bg}_background"
        specs.append(ClassSpec(name, f"a photo with a {bg} background", "background", name in HOLDOUTS))
    specs += [
        ClassSpec("single_digit", "a photo with a single digit", "count", False),
        ClassSpec("two_digits", "a photo with two digits", "count", False),
        ClassSpec("many_digits", "a photo with three or more digits", "count", False),
    ]
    return tuple(specs)


CLASSES: tuple[ClassSpec, ...] = _build_classes()
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
_CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}


def fine_tune_classes() -> tuple[ClassSpec, ...]:
    """CLASSES minus the zero-shot holdouts, in CLASSES order."""
    return tuple(c for c in CLASSES if not c.zero_shot_holdout)


@dataclass(frozen=True)
class _Glyph:
    digit: int
    colour: str
    source: int  # row of sklearn's digits data set
    box: tuple[int, int, int]  # x, y, size of the (pre-rotation) square
    angle: float


@dataclass(frozen=True)
class _Scene:
    background: str
    glyphs: tuple[_Glyph, ...]


@functools.lru_cache(maxsize=1)
def _digit_bank() -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The 1797 8x8 UCI glyphs scaled to [0, 1], and the rows of each digit."""
    from sklearn.datasets import load_digits  # local import: only the generator needs scikit-learn

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    rows = {d: np.flatnonzero(data.target == d) for d in range(10)}
    return images, rows


def _pick(rng: np.random.Generator, weights: Mapping[K, float]) -> K:
    keys = list(weights)
    p = np.array([weights[k] for k in keys])
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _sample_scene(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """Draw background, digit count, digits, colours and non-overlapping boxes for one image."""
    _, rows = _digit_bank()
    background = _pick(rng, BACKGROUNDS)
    count = _pick(rng, COUNTS)
    one_colour = rng.random() < 0.5  # half the images use one colour for every digit
    first_colour = _pick(rng, COLOUR_WEIGHTS)
    boxes = _place_boxes(rng, count, width, height)
    glyphs = []
    for box in boxes:
        digit = _pick(rng, DIGIT_WEIGHTS)
        colour = first_colour if one_colour else _pick(rng, COLOUR_WEIGHTS)
        source = int(rng.choice(rows[digit]))
        glyphs.append(_Glyph(digit, colour, source, box, float(rng.uniform(-15.0, 15.0))))
    return _Scene(background, tuple(glyphs))


def _place_boxes(rng: np.random.Generator, count: int, width: int, height: int) -> list[tuple[int, int, int]]:
    """Rejection-sample `count` disjoint squares; shrink them when the canvas is too crowded."""
    short = min(width, height)
    scale = 0.6 / (1.0 + 0.35 * (count - 1))  # more digits, smaller digits
    for _ in range(20):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(60 * count):
            size = max(8, int(short * scale * rng.uniform(0.6, 1.0)))
            x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
            if all(_disjoint((x, y, size), b) for b in boxes):
                boxes.append((x, y, size))
                if len(boxes) == count:
                    return boxes
        scale *= 0.85
    raise ValueError(f"cannot place {count} digits on a {width}x{height} canvas")


def _disjoint(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[2] <= b[1] or b[1] + b[2] <= a[1]


def _background(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A light, nearly grey two-tone background of the given kind, float32 3xHxW (channel planes)."""
    # Faint tints only: a saturated backdrop would compete with the digit-colour classes.
    light = (rng.uniform(185.0, 235.0) + rng.uniform(-12.0, 12.0, 3)).astype(np.float32)
    dark = light - np.float32(rng.uniform(35.0, 60.0))
    mix = _pattern(kind, rng, width, height)
    if mix is None:
        return np.broadcast_to(light[:, None, None], (3, height, width)).copy()
    # Channel planes keep every array op contiguous; HxWx3 broadcasting is several times slower.
    return np.stack([light[c] + mix * (dark[c] - light[c]) for c in range(3)])


def _pattern(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray | None:
    """Mixing weight of the dark tone per pixel (HxW float32 in [0, 1]); None for a plain background."""
    y, x = np.ogrid[0:height, 0:width]
    x, y = x.astype(np.float32), y.astype(np.float32)
    longest = max(width, height)
    if kind == "plain":
        return None
    if kind == "gradient":
        angle = np.radians(rng.uniform(0.0, 360.0))
        proj = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))
        return (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
    if kind == "striped":
        angle = np.radians(rng.choice([0.0, 45.0, 90.0, 135.0]))
        proj = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))
        period = np.float32(max(4.0, rng.uniform(0.03, 0.09) * longest))
        return ((proj % period) < period / 2).astype(np.float32)
    if kind == "checkered":
        cell = max(2, int(rng.uniform(0.04, 0.1) * longest))
        return (((x // cell) + (y // cell)) % 2).astype(np.float32)
    if kind == "dotted":
        step = np.float32(max(4.0, rng.uniform(0.04, 0.07) * longest))
        dx, dy = (x % step) - step / 2, (y % step) - step / 2
        return ((dx * dx + dy * dy) < (step * np.float32(rng.uniform(0.15, 0.3))) ** 2).astype(np.float32)
    raise ValueError(f"unknown background kind {kind!r}")


def _paste(canvas: np.ndarray, glyph: _Glyph, images: np.ndarray) -> None:
    """Alpha-composite one upscaled, rotated, coloured glyph into its box of the 3xHxW canvas (in place)."""
    x, y, size = glyph.box
    # A blank margin lets strokes fade out and keeps rotated corners inside the box.
    padded = np.pad(images[glyph.source], _GLYPH_PAD)
    small = Image.fromarray((padded * 255).astype(np.uint8), mode="L")
    mask = small.resize((size, size), Image.Resampling.BICUBIC).rotate(glyph.angle, Image.Resampling.BICUBIC)
    # The 8x8 glyphs upscale to soft blobs; a steep ramp turns them into crisp marker strokes.
    alpha = np.clip((np.asarray(mask, np.float32) / 255.0 - 0.3) / 0.35, 0.0, 1.0)
    for c, value in enumerate(COLOUR_RGB[glyph.colour]):
        region = canvas[c, y : y + size, x : x + size]
        region += alpha * (np.float32(value) - region)


def _render(scene: _Scene, rng: np.random.Generator, width: int, height: int) -> bytes:
    """Draw a scene and encode it as JPEG bytes."""
    images, _ = _digit_bank()
    canvas = _background(scene.background, rng, width, height)
    for glyph in scene.glyphs:
        _paste(canvas, glyph, images)
    canvas += rng.standard_normal((height, width), dtype=np.float32) * np.float32(_GRAIN_SIGMA)
    planes = np.clip(canvas, 0.0, 255.0).astype(np.uint8)
    image = Image.merge("RGB", [Image.fromarray(plane, mode="L") for plane in planes])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _clean_labels(scene: _Scene) -> list[str]:
    """Ground-truth class names of a scene, in CLASSES order."""
    names = {f"digit_{g.digit}" for g in scene.glyphs} | {g.colour for g in scene.glyphs}
    names |= {f"{scene.background}_background", COUNT_CLASSES[len(scene.glyphs)]}
    return sorted(names, key=_CLASS_INDEX.__getitem__)


_DIGIT_PHRASES = ("a {c} {d}", "the digit {d} in {c}", "a {c} handwritten {d}", "a {d} written in {c}")
_COUNT_PHRASES = {
    1: ("a single digit", "one digit", "one handwritten digit"),
    2: ("two digits", "a pair of digits", "two handwritten digits"),
    3: ("three digits", "several digits", "a group of three digits"),
    4: ("four digits", "several digits", "a group of four digits"),
}
_BACKGROUND_PHRASES = {
    "plain": ("a plain background", "a plain, solid background", "a solid plain backdrop"),
    "gradient": ("a gradient background", "a smoothly shaded gradient", "a soft gradient backdrop"),
    "striped": ("a striped background", "a background with stripes", "a striped backdrop"),
    "checkered": ("a checkered background", "a checkerboard background", "a checkered backdrop"),
    "dotted": ("a dotted background", "a polka-dot background", "a dotted backdrop"),
}
_SENTENCES = (
    "{count} on {bg}: {digits}.",
    "A photo of {digits} on {bg}, {count} in total.",
    "{digits} over {bg}; {count}.",
    "An image showing {count}, {digits}, on {bg}.",
)


def _caption(scene: _Scene, rng: np.random.Generator) -> str:
    """A natural-language description naming every clean label (digits as numerals, counts as words)."""
    phrase = _DIGIT_PHRASES[int(rng.integers(len(_DIGIT_PHRASES)))]
    parts = [phrase.format(c=g.colour, d=g.digit) for g in scene.glyphs]
    digits = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    count_options = _COUNT_PHRASES[len(scene.glyphs)]
    bg_options = _BACKGROUND_PHRASES[scene.background]
    template = _SENTENCES[int(rng.integers(len(_SENTENCES)))]
    text = template.format(
        count=count_options[int(rng.integers(len(count_options)))],
        bg=bg_options[int(rng.integers(len(bg_options)))],
        digits=digits,
    )
    text = re.sub(r"\b([Aa]) (?=[aeiou8])", r"\1n ", text)  # "an orange 3", "an 8"
    return text[0].upper() + text[1:]


def assign_splits(n: int, seed: int) -> list[str]:
    """Deterministic ~70/15/15 train/val/test assignment of n items."""
    order = _stream(seed, _SPLIT_KEY).permutation(n)
    n_train, n_val = round(0.70 * n), round(0.15 * n)
    split = np.full(n, "test", dtype=object)
    split[order[:n_train]] = "train"
    split[order[n_train : n_train + n_val]] = "val"
    return [str(s) for s in split]


def corrupt_labels(clean: list[str], rng: np.random.Generator, rate: float) -> list[str]:
    """Drop each positive with probability `rate`; add as many false positives in expectation."""
    kept = [name for name in clean if rng.random() >= rate]
    negatives = [name for name in CLASS_NAMES if name not in clean]
    # Spreading the additions over all negatives keeps the noise class-agnostic, as annotator noise is.
    p_add = min(1.0, rate * len(clean) / max(len(negatives), 1))
    added = [name for name in negatives if rng.random() < p_add]
    return sorted(set(kept) | set(added), key=_CLASS_INDEX.__getitem__)


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _remove_stale(image_dir: Path, n_images: int) -> None:
    """Delete images a previous, larger run left behind, so the folder matches the catalogue."""
    stale = [p for p in image_dir.glob("*.jpg") if _FILE_NAME.fullmatch(p.name) and int(p.stem) >= n_images]
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d stale sample images from %s", len(stale), image_dir)


def generate_sample(cfg: SampleCfg) -> SampleCatalogue:
    """Write cfg.n_images JPEGs under cfg.out_dir/images and return the catalogue and labels frames."""
    image_dir = Path(cfg.out_dir).resolve() / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(image_dir, cfg.n_images)
    log.info("generating %d sample images (%dx%d, seed %d) in %s",
             cfg.n_images, cfg.width, cfg.height, cfg.seed, image_dir)
    splits = assign_splits(cfg.n_images, cfg.seed)
    rows = []
    for i, split in enumerate(splits):
        rows.append(_make_image(cfg, i, split, image_dir))
        if (i + 1) % 100 == 0:
            log.debug("rendered %d/%d images", i + 1, cfg.n_images)
    frame = pd.DataFrame(rows)
    log.info("sample ready: %d images, %d positive labels", len(frame), int(frame["clean_labels"].map(len).sum()))
    return SampleCatalogue(
        image_dir=image_dir,
        catalogue=frame[["image_id", "uri", "updated_at"]].reset_index(drop=True),
        labels=frame[["image_id", "uri", "labels", "clean_labels", "split", "caption"]].reset_index(drop=True),
    )


def _make_image(cfg: SampleCfg, i: int, split: str, image_dir: Path) -> dict[str, object]:
    """Render, write and describe image i; its own seed streams make it independent of the other rows."""
    rng = _stream(cfg.seed, _IMAGE_KEY, i)
    scene = _sample_scene(rng, cfg.width, cfg.height)
    path = image_dir / f"{i:06d}.jpg"  # not <image_id>.jpg: the id is derived from this very path
    path.write_bytes(_render(scene, rng, cfg.width, cfg.height))
    clean = _clean_labels(scene)
    # Noise is drawn for every row whatever its split, so changing the split rule leaves the noise alone.
    noisy = corrupt_labels(clean, _stream(cfg.seed, _NOISE_KEY, i), cfg.noise_rate)
    offset = pd.Timedelta(seconds=int(_stream(cfg.seed, _TIME_KEY, i).integers(0, 30 * 86400)))
    uri = str(path)
    return {
        "image_id": image_id_for(uri),
        "uri": uri,
        "updated_at": _EPOCH + offset,
        "labels": noisy if split == "train" else list(clean),
        "clean_labels": clean,
        "split": split,
        "caption": _caption(scene, rng),
    }
