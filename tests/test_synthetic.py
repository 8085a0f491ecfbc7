import hashlib
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedsim.data.schema import OPTION_LETTERS, features, check_schema
from fedsim.data.synthetic import (
    CLASS_OPTIONS,
    COLOURS,
    COOL_WEATHER,
    FRAGILE,
    LEFT,
    RIGHT,
    STRIP_HEIGHT,
    STURDY,
    TASK_NUM_CLASSES,
    WARM,
    WARM_WEATHER,
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
    assert list(features()) == ["image", "text", "question", "answer", "label", "options", "has_image",
                              "has_text", "task", "source"]
    assert isinstance(features()["image"], datasets.Image)


@pytest.mark.parametrize("task", ["classification", "vqa", "pretrain"])
def test_generated_rows_follow_the_schema(task):
    ds = generate(task, 20, "train", seed=0)
    assert ds.features == features()
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


def test_a_test_seed_gives_every_run_seed_the_same_test_split():
    a = load_synthetic("classification", num_train=50, num_test=40, image_size=32, seed=1000, test_seed=7)
    b = load_synthetic("classification", num_train=50, num_test=40, image_size=32, seed=1001, test_seed=7)
    assert _image_digests(a.test) == _image_digests(b.test) and a.test["text"] == b.test["text"]
    assert a.train["text"] != b.train["text"]


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


def _observed(row: dict, text_in_image: bool) -> dict[str, tuple]:
    """What each modality of a classification row shows, read back from its pixels and words alone: the
    image's colour temperature, its item's size class (and the glyph strip's word); the note's describing
    word and its weather word."""
    pixels = np.asarray(row["image"])
    item = pixels[:-STRIP_HEIGHT] if text_in_image else pixels
    area = (np.abs(item.astype(float) - 235).max(axis=2) > 60).sum()
    large = area > 0.1 * item.shape[0] * item.shape[1]  # small items cover 4.5-7% of the frame, large 14-19%
    image = (_colour_of(item) in WARM, bool(large))
    if text_in_image:
        image += (tuple(pixels[-1, ::4, 0] < 128),)
    words = row["text"].split()
    weather = [w for w in words if w in WARM_WEATHER + COOL_WEATHER]
    assert len(weather) == 1, row["text"]
    return {"image": image, "text": (_qualifier(row["text"]) in STURDY, weather[0] in WARM_WEATHER)}


def _empirical_bayes(rows: datasets.Dataset, modalities: tuple[str, ...], text_in_image: bool) -> float:
    """The accuracy of the best guess from what the given modalities show: per observation, its most frequent
    label, over the rows themselves."""
    counts: dict[tuple, np.ndarray] = {}
    for row in rows:
        seen = _observed(row, text_in_image)
        key = tuple(seen[m] for m in modalities)
        counts.setdefault(key, np.zeros(4))[row["label"]] += 1
    return sum(c.max() for c in counts.values()) / len(rows)


@pytest.mark.parametrize("cues", [Cues(), Cues(0.9, 0.6), Cues(text_in_image=True)], ids=["default", "image-dominant",
                                                                                         "text-in-image"])
def test_bayes_ceilings_follow_from_the_generator(cues, classification):
    """The ceilings Cues.bayes_accuracy states are those of the generated rows, read back from pixels and words."""
    rows = classification if cues == Cues() else generate("classification", 1500, "train", seed=1, cues=cues)
    for modalities, image, text in [(("image", "text"), True, True), (("image",), True, False),
                                    (("text",), False, True), ((), False, False)]:
        measured = _empirical_bayes(rows, modalities, cues.text_in_image)
        # 1500-2000 rows: a binomial standard error of at most 1.3 points
        assert abs(measured - cues.bayes_accuracy(image, text)) < 0.035, (modalities, measured)


def test_default_ceilings_leave_room_for_both_modalities():
    cues = Cues()
    assert 0.85 <= cues.bayes_accuracy() <= 0.9
    assert 0.6 <= cues.bayes_accuracy(image=False) <= 0.7 and 0.6 <= cues.bayes_accuracy(text=False) <= 0.7
    assert cues.bayes_accuracy(image=False, text=False) == 0.25


def test_each_cue_is_right_at_its_configured_rate(classification):
    rows = [(_observed(row, False), divmod(row["label"], 2)) for row in classification]
    cues = Cues()
    rates = {"colour": np.mean([seen["image"][0] != cool for seen, (cool, _) in rows]),
             "size": np.mean([seen["image"][1] == sturdy for seen, (_, sturdy) in rows]),
             "word": np.mean([seen["text"][0] == sturdy for seen, (_, sturdy) in rows]),
             "weather": np.mean([seen["text"][1] != cool for seen, (cool, _) in rows])}
    expected = {"colour": cues.cue_reliability, "size": cues.size_reliability, "word": cues.cue_reliability,
                "weather": cues.weather_reliability}
    assert {k: abs(rates[k] - expected[k]) < 0.03 for k in rates} == dict.fromkeys(rates, True), rates


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


@pytest.mark.parametrize("cues, key", [(dict(image_share=0.4), "image_share"), (dict(text_share=0.95), "text_share"),
                                       (dict(cue_reliability=1.2), "cue_reliability"),
                                       (dict(cue_reliability=0.6), "image_share")])
def test_cues_outside_their_range_name_the_key(cues, key):
    with pytest.raises(ValueError, match=f"data.{key}"):
        Cues(**cues)


def test_classification_label_and_options(classification):
    for row in list(classification)[:50]:
        assert row["answer"] == OPTION_LETTERS[row["label"]]
        assert row["options"] == CLASS_OPTIONS
        assert row["task"] == "classification" and row["has_image"] and row["has_text"]


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
    # both modalities, or the one the question needs only (the image only, the note only)
    pairs = set(zip(ds["has_image"], ds["has_text"]))
    assert pairs == {(True, True), (True, False), (False, True)}


@pytest.mark.parametrize("variant, cues", [("image-dominant", Cues(0.9, 0.6)), ("text-in-image", Cues(text_in_image=True))])
def test_shipped_benchmark_variants_load_onto_the_cpu_twin(variant, cues):
    from fedsim.validation import load_config

    root = Path(__file__).resolve().parents[1] / "experiments" / "fedmllm"
    data = load_config([root / "cpu.yaml", root / "variants" / f"{variant}.yaml"]).data
    assert Cues.from_config(data) == cues
