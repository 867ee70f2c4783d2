"""The seeded sample catalogue: determinism, image files, labels, captions, noise and splits."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mumic_batch.config import SampleCfg
from mumic_batch.core import sample
from mumic_batch.core.ids import image_id_for

SMALL = {"width": 320, "height": 240}  # small canvases keep the suite fast; layout logic is the same
NOISE = 0.2  # high enough that the measured rate is precise on ~200 training rows

# Written independently of the generator's phrase tables: what a caption must contain per class.
CAPTION_TERMS = {
    "plain_background": ("plain", "solid"),
    "gradient_background": ("gradient", "shaded"),
    "striped_background": ("striped", "stripes"),
    "checkered_background": ("checkered", "checkerboard"),
    "dotted_background": ("dotted", "polka-dot"),
    "single_digit": ("single digit", "one digit", "one handwritten digit"),
    "two_digits": ("two digits", "pair of digits", "two handwritten digits"),
    "many_digits": ("three", "four", "several digits"),
}


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory) -> sample.SampleCatalogue:
    out = tmp_path_factory.mktemp("sample")
    return sample.generate_sample(SampleCfg(out_dir=str(out), n_images=300, seed=3, noise_rate=NOISE, **SMALL))


def _class_mentioned(name: str, caption: str) -> bool:
    text = caption.lower()
    if name.startswith("digit_"):
        return re.search(rf"\b{name[-1]}\b", text) is not None
    terms = CAPTION_TERMS.get(name, (name,))
    return any(re.search(rf"\b{re.escape(t)}\b", text) for t in terms)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _without_paths(frame: pd.DataFrame) -> pd.DataFrame:
    """Frame minus the columns that embed the output directory, plus the file names."""
    out = frame.drop(columns=["image_id", "uri"])
    return out.assign(file=frame["uri"].map(lambda u: Path(u).name))


def test_same_seed_same_bytes_and_frames(tmp_path: Path) -> None:
    runs = [sample.generate_sample(SampleCfg(out_dir=str(tmp_path / d), n_images=25, seed=5, **SMALL)) for d in "ab"]
    assert _files(runs[0].image_dir) == _files(runs[1].image_dir)
    pd.testing.assert_frame_equal(_without_paths(runs[0].labels), _without_paths(runs[1].labels))
    pd.testing.assert_frame_equal(_without_paths(runs[0].catalogue), _without_paths(runs[1].catalogue))
    other = sample.generate_sample(SampleCfg(out_dir=str(tmp_path / "c"), n_images=25, seed=6, **SMALL))
    differing = sum(x != y for x, y in zip(_files(runs[0].image_dir).values(), _files(other.image_dir).values()))
    assert differing == 25
    assert list(runs[0].labels["caption"]) != list(other.labels["caption"])


def test_images_are_real_size_jpegs(tmp_path: Path) -> None:
    cat = sample.generate_sample(SampleCfg(out_dir=str(tmp_path), n_images=12, seed=1))
    sizes = []
    for uri in cat.catalogue["uri"]:
        with Image.open(uri) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (640, 480), "RGB")
        sizes.append(Path(uri).stat().st_size)
    assert 20_000 <= float(np.median(sizes)) <= 100_000
    assert 10_000 <= min(sizes) and max(sizes) <= 200_000


def test_frames_ids_and_files(cat: sample.SampleCatalogue) -> None:
    assert list(cat.catalogue.columns) == ["image_id", "uri", "updated_at"]
    assert list(cat.labels.columns) == ["image_id", "uri", "labels", "clean_labels", "split", "caption"]
    assert str(cat.catalogue["updated_at"].dt.tz) == "UTC"
    ids = cat.catalogue["image_id"]
    assert ids.is_unique and len(ids) == 300
    assert list(ids) == [image_id_for(u) for u in cat.catalogue["uri"]]
    assert list(cat.labels["image_id"]) == list(ids) and list(cat.labels["uri"]) == list(cat.catalogue["uri"])
    assert all(Path(u).is_absolute() and Path(u).parent == cat.image_dir for u in cat.catalogue["uri"])
    assert sorted(p.name for p in cat.image_dir.iterdir()) == sorted(Path(u).name for u in cat.catalogue["uri"])


def test_image_id_is_stable_sha1_prefix() -> None:
    assert image_id_for("s3://bucket/a.jpg") == "c17f3f669d533670"  # printf 's3://bucket/a.jpg' | sha1sum
    assert image_id_for("s3://bucket/a.jpg") != image_id_for("s3://bucket/b.jpg")


def test_class_list() -> None:
    names = [c.name for c in sample.CLASSES]
    assert len(set(names)) == len(names) and 15 <= len(names) <= 30
    assert {c.group for c in sample.CLASSES} == {"digit", "colour", "background", "count"}
    holdouts = [c for c in sample.CLASSES if c.zero_shot_holdout]
    assert 1 <= len(holdouts) <= 3
    assert [c for c in sample.CLASSES if c not in holdouts] == list(sample.fine_tune_classes())
    prompts = [c.prompt for c in sample.CLASSES]
    assert len(set(prompts)) == len(prompts) and all(p.startswith("a photo with ") for p in prompts)


def test_every_clean_label_is_in_the_caption(cat: sample.SampleCatalogue) -> None:
    for clean, caption in zip(cat.labels["clean_labels"], cat.labels["caption"]):
        assert clean and all(_class_mentioned(name, caption) for name in clean), (clean, caption)
        absent_digits = {f"digit_{d}" for d in range(10)} - set(clean)
        assert not any(_class_mentioned(name, caption) for name in absent_digits), (clean, caption)
    assert cat.labels["caption"].nunique() > 250  # phrasing varies, not only the content


def test_labels_are_structurally_valid(cat: sample.SampleCatalogue) -> None:
    groups = {c.name: c.group for c in sample.CLASSES}
    for clean in cat.labels["clean_labels"]:
        per_group = Counter(groups[name] for name in clean)
        assert per_group["background"] == 1 and per_group["count"] == 1
        n_digits = {"single_digit": 1, "two_digits": 2}.get(next(n for n in clean if groups[n] == "count"), 4)
        assert 1 <= per_group["digit"] <= n_digits and 1 <= per_group["colour"] <= n_digits
        assert clean == sorted(clean, key=[c.name for c in sample.CLASSES].index)


def test_colour_labels_match_pixels(cat: sample.SampleCatalogue) -> None:
    """A colour is labelled exactly when glyph pixels of that colour are in the image."""
    palette = np.array(list(sample.COLOUR_RGB.values()), np.float32)
    for uri, clean in zip(cat.labels["uri"], cat.labels["clean_labels"]):
        with Image.open(uri) as image:
            pixels = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)
        pixels = pixels[pixels.min(axis=1) < 110]  # every glyph colour has a dark channel; backgrounds do not
        dist = np.linalg.norm(pixels[:, None, :] - palette[None, :, :], axis=2)
        present = {name for name, n in zip(sample.COLOUR_RGB, (dist < 45).sum(axis=0)) if n >= 30}
        assert present == set(clean) & set(sample.COLOUR_RGB), (uri, clean)


def test_class_distribution_is_imbalanced(cat: sample.SampleCatalogue) -> None:
    support = Counter(name for labels in cat.labels["clean_labels"] for name in labels)
    counts = [support[c.name] for c in sample.CLASSES]
    assert min(counts) >= 3  # every class, holdouts included, occurs in a 300-image sample
    assert max(counts) >= 6 * min(counts)
    assert sorted(counts, reverse=True)[2] >= 90  # a few majority classes
    for group in ("digit", "colour", "background"):  # skewed within each group too, not only across
        within = [support[c.name] for c in sample.CLASSES if c.group == group]
        assert max(within) >= 2.5 * min(within), (group, within)


def test_rerun_with_fewer_images_removes_stale_files(tmp_path: Path) -> None:
    sample.generate_sample(SampleCfg(out_dir=str(tmp_path), n_images=8, **SMALL))
    (tmp_path / "images" / "notes.jpg").write_bytes(b"not ours")
    cat = sample.generate_sample(SampleCfg(out_dir=str(tmp_path), n_images=5, **SMALL))
    names = sorted(p.name for p in cat.image_dir.iterdir())
    assert names == sorted([Path(u).name for u in cat.catalogue["uri"]] + ["notes.jpg"])


def test_noise_only_in_train_and_near_the_rate(cat: sample.SampleCatalogue) -> None:
    labels = cat.labels
    held = labels[labels["split"] != "train"]
    assert all(a == b for a, b in zip(held["labels"], held["clean_labels"]))
    train = labels[labels["split"] == "train"]
    n_clean = sum(len(c) for c in train["clean_labels"])
    dropped = sum(len(set(c) - set(n)) for n, c in zip(train["labels"], train["clean_labels"]))
    added = sum(len(set(n) - set(c)) for n, c in zip(train["labels"], train["clean_labels"]))
    assert dropped / n_clean == pytest.approx(NOISE, abs=0.05)
    assert added / n_clean == pytest.approx(NOISE, abs=0.05)
    names = {c.name for c in sample.CLASSES}
    assert all(set(n) <= names for n in train["labels"])


def test_zero_noise_keeps_labels_clean(tmp_path: Path) -> None:
    cat = sample.generate_sample(SampleCfg(out_dir=str(tmp_path), n_images=30, noise_rate=0.0, **SMALL))
    assert all(a == b for a, b in zip(cat.labels["labels"], cat.labels["clean_labels"]))


def test_split_proportions(cat: sample.SampleCatalogue) -> None:
    assert cat.labels["split"].value_counts().to_dict() == {"train": 210, "val": 45, "test": 45}
    assert sample.assign_splits(300, 3) == list(cat.labels["split"])
    assert sample.assign_splits(300, 4) != list(cat.labels["split"])
