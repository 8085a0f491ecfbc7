import hashlib

import datasets
import numpy as np
import pytest

from fedsim.data.schema import FEATURES, OPTION_LETTERS, check_schema
from fedsim.data.synthetic import (
    CLASS_OPTIONS,
    COLOURS,
    FRAGILE,
    LEFT,
    RIGHT,
    STURDY,
    TASK_NUM_CLASSES,
    WARM,
    generate,
    load_synthetic,
)

COLOUR_NAMES = list(COLOURS)


def _image_digests(ds: datasets.Dataset) -> list[str]:
    raw = ds.cast_column("image", datasets.Image(decode=False))["image"]
    return [hashlib.sha256(r["bytes"]).hexdigest() if r is not None else "" for r in raw]


def _colour_of(pixels: np.ndarray) -> str:
    """The palette colour of the shape drawn in ``pixels`` (H x W x 3), ignoring the light background."""
    pixels = pixels.reshape(-1, 3).astype(float)
    shape = pixels[np.abs(pixels - 235).max(axis=1) > 60]  # background noise has sigma 12 around 235
    assert len(shape) > 10, "no shape found in the image"
    rgb = np.median(shape, axis=0)
    return min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - rgb) ** 2))


def _qualifier(text: str) -> str:
    found = [w for w in text.split() if w in FRAGILE + STURDY]
    assert len(found) == 1, text
    return found[0]


@pytest.fixture(scope="module")
def classification():
    return generate("classification", 2000, "train", seed=0)


def test_schema_features():
    assert list(FEATURES) == ["image", "text", "question", "answer", "label", "options", "has_image",
                              "has_text", "task", "source"]
    assert isinstance(FEATURES["image"], datasets.Image)


@pytest.mark.parametrize("task", ["classification", "vqa", "pretrain"])
def test_generated_rows_follow_the_schema(task):
    ds = generate(task, 20, "train", seed=0)
    assert ds.features == FEATURES
    assert len(ds) == 20
    check_schema(ds, task)
    assert set(ds["source"]) == {f"synthetic/{task}"}


def test_check_schema_names_missing_columns():
    ds = generate("vqa", 3, "train", seed=0).remove_columns(["label", "has_text"])
    with pytest.raises(ValueError, match=r"'mine'.*\['has_text', 'label'\]"):
        check_schema(ds, "mine")


def test_same_seed_gives_identical_rows_including_image_bytes():
    a = generate("classification", 30, "train", seed=5)
    b = generate("classification", 30, "train", seed=5)
    for column in ("text", "question", "answer", "label", "options"):
        assert a[column] == b[column]
    assert _image_digests(a) == _image_digests(b)


@pytest.mark.parametrize("other", [dict(seed=6, split="train"), dict(seed=5, split="test")])
def test_other_seed_or_split_gives_other_rows(other):
    a = generate("classification", 30, "train", seed=5)
    b = generate("classification", 30, other["split"], seed=other["seed"])
    assert a["text"] != b["text"]
    assert not set(_image_digests(a)) & set(_image_digests(b))


def test_splits_are_separate_streams():
    splits = load_synthetic("classification", num_train=200, num_test=100, image_size=32, seed=0)
    assert len(splits.train) == 200 and len(splits.test) == 100
    assert splits.num_classes == 4 and splits.task == "classification"
    assert not set(_image_digests(splits.train)) & set(_image_digests(splits.test))
    # The test split does not depend on how many training samples were drawn.
    bigger = load_synthetic("classification", num_train=300, num_test=100, image_size=32, seed=0)
    assert _image_digests(bigger.test) == _image_digests(splits.test)


@pytest.mark.parametrize("task", ["classification", "vqa", "pretrain"])
@pytest.mark.parametrize("size", [16, 48])
def test_image_size_honoured(task, size):
    ds = generate(task, 12, "train", seed=0, image_size=size)
    images = [im for im in ds["image"] if im is not None]
    assert images
    assert all(im.size == (size, size) and im.mode == "RGB" for im in images)


def test_unknown_task_rejected():
    with pytest.raises(ValueError, match="caption"):
        generate("caption", 3, "train", seed=0)


def test_num_classes_per_task():
    assert TASK_NUM_CLASSES == {"classification": 4, "vqa": 6, "textqa": 2}


def test_textqa_is_text_only_and_answers_from_the_note():
    rows = generate("textqa", 400, "train", seed=0)
    assert not any(rows["has_image"]) and all(rows["has_text"]) and set(rows["task"]) == {"vqa"}
    for row in rows:
        assert row["answer"] == ("yes" if _qualifier(row["text"]) in STURDY else "no")
    assert 0.4 < np.mean([a == "yes" for a in rows["answer"]]) < 0.6


def test_classification_label_matches_text_and_image(classification):
    rows = classification.select(range(500))
    for row in rows:
        sturdy = _qualifier(row["text"]) in STURDY
        cool = _colour_of(np.asarray(row["image"])) not in WARM
        assert row["label"] == 2 * cool + sturdy, row["text"]
        assert row["answer"] == OPTION_LETTERS[row["label"]]
        assert row["options"] == CLASS_OPTIONS
        assert row["task"] == "classification" and row["has_image"] and row["has_text"]


def test_classification_needs_both_modalities(classification):
    labels = np.array(classification["label"])
    sturdy = np.array([_qualifier(t) in STURDY for t in classification["text"]])
    # Text alone fixes the sturdy bit but not the warm/cool bit: within each qualifier group cool is ~50%.
    cool = labels // 2
    for group in (sturdy, ~sturdy):
        assert 0.4 < cool[group].mean() < 0.6
    # Image alone fixes the warm/cool bit but not the sturdy bit: within each warmth group sturdy is ~50%.
    for group in (cool == 0, cool == 1):
        assert 0.4 < (labels[group] % 2).mean() < 0.6
    # Each sturdy word co-occurs with both a warm and a cool class.
    for word in STURDY:
        classes = set(labels[[word in t.split() for t in classification["text"]]])
        assert classes == {1, 3}


def test_classification_classes_roughly_balanced(classification):
    counts = np.bincount(classification["label"], minlength=4)
    assert len(counts) == 4
    assert counts.min() > 0.2 * len(classification) and counts.max() < 0.3 * len(classification)


def test_vqa_answer_is_the_colour_on_the_named_side():
    ds = generate("vqa", 200, "train", seed=0)
    sides = set()
    for row in ds:
        assert row["answer"] in COLOURS
        assert row["label"] == COLOUR_NAMES.index(row["answer"])
        assert row["options"] == [] and row["task"] == "vqa"
        named = [w for w in row["text"].split() if w in LEFT + RIGHT]
        assert len(named) == 1, row["text"]
        sides.add(named[0])
        pixels = np.asarray(row["image"])
        half = pixels.shape[1] // 2
        left, right = _colour_of(pixels[:, :half]), _colour_of(pixels[:, half:])
        assert left != right
        assert row["answer"] == (right if named[0] in RIGHT else left)
    assert sides == set(LEFT + RIGHT)  # every synonym shows up


def test_pretrain_mixes_modalities_with_consistent_flags():
    ds = generate("pretrain", 200, "pretrain", seed=0)
    images, texts = ds["image"], ds["text"]
    for image, text, has_image, has_text in zip(images, texts, ds["has_image"], ds["has_text"]):
        assert has_image == (image is not None)
        assert has_text == (text is not None)
        assert has_image or has_text
    pairs = set(zip(ds["has_image"], ds["has_text"]))
    assert (True, False) in pairs and (False, True) in pairs
