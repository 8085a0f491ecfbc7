import hashlib
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedsim.data.schema import FEATURES, OPTION_LETTERS, check_schema
from fedsim.data.synthetic import (
    CLASS_OPTIONS,
    COLOURS,
    COOL_HINTS,
    FRAGILE,
    LEFT,
    RIGHT,
    STRIP_HEIGHT,
    STURDY,
    STURDY_SHAPES,
    TASK_NUM_CLASSES,
    WARM,
    WARM_HINTS,
    Cues,
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


def _shape_of(pixels: np.ndarray) -> str:
    """The shape drawn in ``pixels``, from its mask's fill of its bounding box and its top/bottom balance."""
    mask = np.abs(pixels.astype(float) - 235).max(axis=2) > 60
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill, half = box.mean(), len(box) // 2
    if fill > 0.95:
        return "square"
    if fill > 0.66:
        return "circle"
    return "triangle" if box[:half].sum() < 0.6 * box[len(box) - half:].sum() else "diamond"


def _solo_accuracies(rows: datasets.Dataset) -> tuple[float, float]:
    """Accuracy of the best answer from the image alone (colour, and shape as a sturdiness hint) and from
    the note alone (describing word, and a temperature word as a colour hint; none: guess warm)."""
    image_right = text_right = 0
    for row in rows:
        cool, sturdy = divmod(row["label"], 2)
        pixels = np.asarray(row["image"])
        image_cool = _colour_of(pixels) not in WARM
        image_sturdy = _shape_of(pixels) in STURDY_SHAPES
        image_right += (image_cool, image_sturdy) == (cool, sturdy)
        words = row["text"].split()
        text_cool = any(w in COOL_HINTS for w in words)
        text_right += (text_cool, _qualifier(row["text"]) in STURDY) == (cool, sturdy)
    return image_right / len(rows), text_right / len(rows)


@pytest.mark.parametrize("image_share, text_share", [(0.5, 0.5), (0.7, 0.7), (0.9, 0.6), (1.0, 1.0)])
def test_each_modality_alone_reaches_its_configured_share(image_share, text_share):
    rows = generate("classification", 800, "train", seed=1, cues=Cues(image_share, text_share))
    image_alone, text_alone = _solo_accuracies(rows)
    # 800 rows: a binomial standard error of at most 1.8 points
    assert abs(image_alone - image_share) < 0.06 and abs(text_alone - text_share) < 0.06


def test_shape_and_word_hints_are_never_wrong():
    misread = 0
    for row in generate("classification", 300, "train", seed=2, cues=Cues(1.0, 1.0)):
        cool, sturdy = divmod(row["label"], 2)
        misread += (_shape_of(np.asarray(row["image"])) in STURDY_SHAPES) != sturdy
        assert any(w in (COOL_HINTS if cool else WARM_HINTS) for w in row["text"].split())
    assert misread <= 3  # the pixel reader of shapes misses the odd small, noisy item


def test_text_in_image_draws_the_describing_word_into_the_pixels():
    rows = generate("classification", 200, "train", seed=3, cues=Cues(text_in_image=True))
    strips = {}
    for row in rows:
        pixels = np.asarray(row["image"])
        strip = tuple(pixels[-1, ::4, 0] < 128)  # the 8 cells' dark/light pattern on the bottom row
        strips.setdefault(strip, set()).add(_qualifier(row["text"]))
        assert _colour_of(pixels[:-STRIP_HEIGHT]) in COLOURS
    # one pattern per describing word, so the image alone tells fragile from sturdy
    assert len(strips) == len(FRAGILE + STURDY) and all(len(words) == 1 for words in strips.values())


@pytest.mark.parametrize("key, value", [("image_share", 0.4), ("text_share", 1.2)])
def test_a_share_outside_its_range_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"data.{key}"):
        Cues(**{key: value})


def test_classification_cues_do_not_shift_the_label(classification):
    labels = np.array(classification["label"])
    sturdy = np.array([_qualifier(t) in STURDY for t in classification["text"]])
    # The describing word fixes the sturdy bit but not the warm/cool bit: within each group cool is ~50%.
    cool = labels // 2
    for group in (sturdy, ~sturdy):
        assert 0.4 < cool[group].mean() < 0.6
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
    # every mix a client may hold: both, image only, note only, neither
    pairs = set(zip(ds["has_image"], ds["has_text"]))
    assert pairs == {(True, True), (True, False), (False, True), (False, False)}


@pytest.mark.parametrize("variant, cues", [("image-dominant", Cues(0.9, 0.6)), ("text-in-image", Cues(text_in_image=True))])
def test_shipped_benchmark_variants_load_onto_the_cpu_twin(variant, cues):
    from fedsim.validation import load_config

    root = Path(__file__).resolve().parents[1] / "experiments" / "fedmllm"
    data = load_config([root / "cpu.yaml", root / "variants" / f"{variant}.yaml"]).data
    assert Cues(data.image_share, data.text_share, data.text_in_image) == cues
