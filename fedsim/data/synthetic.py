"""Procedurally generated image + text benchmark, deterministic by seed.

The main task needs both modalities for a perfect answer, and each modality alone carries a controllable
share of it, as in real data, where modalities are partly redundant:

- ``classification``: one coloured shape in the image, a note in the text. The class is
  (warm or cool colour, from the image) x (fragile or sturdy parcel, from a synonym in the text):
  4 options, chance 25%. Each modality also hints at the other's attribute (``Cues``): the item's shape
  leans to the parcel's sturdiness (square/diamond sturdy, circle/triangle fragile) and the note may carry
  a temperature word (sunny, icy, ...) matching the colour. ``image_share`` and ``text_share`` set the
  accuracy each modality alone can reach, from 0.5 (its own half of the label only) to 1 (the whole
  label); both together always reach 100%. With ``text_in_image`` the note's describing word is also
  drawn into the image as a glyph strip (like a meme's caption), so missing text costs almost nothing.
- ``vqa``: two shapes of different colours, left and right; the note says which one is meant (with
  synonyms); the answer is that item's colour word. Without text 50%, without image 1/6.
- ``textqa``: text only, a yes/no question about a note ("Can other parcels be stacked on it?": yes when
  the parcel is sturdy); the text-only QA clients' task in the ``modality_task`` scenario.
- ``pretrain``: generic questions used only to pre-train the tiny preset, never for client data: the
  colour, shape or colour temperature of an item (one item, or the left/right one of two), the describing
  word of a note and what it means, and option-letter answers (``PRETRAIN_KINDS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

from fedsim.data.schema import FEATURES, OPTION_LETTERS, DatasetSplits

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (250, 130, 20),
    "yellow": (225, 205, 30),
    "green": (44, 160, 44),
    "blue": (31, 100, 200),
    "purple": (140, 70, 190),
}
WARM = ("red", "orange", "yellow")
SHAPES = ("circle", "square", "triangle", "diamond")
FRAGILE = ("fragile", "delicate", "brittle", "flimsy")
STURDY = ("sturdy", "solid", "robust", "tough")
NEUTRAL = ("large", "small", "old", "new", "heavy", "light", "square", "round")
# Temperature words a note may carry as a hint to the item's colour (the ``text_share`` cue).
WARM_HINTS = ("sunny", "toasty", "fiery")
COOL_HINTS = ("icy", "frosty", "chilly")
# Shapes the item leans to as a hint to the parcel's sturdiness (the ``image_share`` cue).
STURDY_SHAPES = ("square", "diamond")
FRAGILE_SHAPES = ("circle", "triangle")
STRIP_HEIGHT = 4  # rows at the image's bottom that hold the glyph strip of ``text_in_image``
SUBJECTS = ("the parcel", "this box", "the crate", "our package")
VERBS = ("is", "looks", "seems", "feels")
LEFT = ("left", "west", "first")
RIGHT = ("right", "east", "second")

CLASS_OPTIONS = ["warm fragile", "warm sturdy", "cool fragile", "cool sturdy"]
CLASS_QUESTION = "How should the parcel be labelled?"
VQA_QUESTION = "What colour is the item the note points to?"
POINTING_NOTE = "the note points to the {side} item"
TEXTQA_QUESTION = "Can other parcels be stacked on it?"
SPLIT_STREAMS = {"train": 0, "test": 1, "pretrain": 2}
TASK_NUM_CLASSES = {"classification": len(CLASS_OPTIONS), "vqa": len(COLOURS), "textqa": 2}


@dataclass(frozen=True)
class Cues:
    """How much of the classification label each modality carries on its own (see the module docstring)."""

    image_share: float = 0.7
    text_share: float = 0.7
    text_in_image: bool = False

    def __post_init__(self) -> None:
        for key in ("image_share", "text_share"):
            if not 0.5 <= getattr(self, key) <= 1:
                raise ValueError(f"config key 'data.{key}' has invalid value {getattr(self, key)!r}: expected "
                                 "a value in [0.5, 1], the accuracy that modality alone can reach")

    @staticmethod
    def hint_probability(share: float) -> float:
        """P(a hint is present) for a given solo accuracy: a present hint is right, an absent one leaves a
        fair coin, so the solo accuracy is q + (1 - q) / 2 = share."""
        return 2 * share - 1


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    # triangle, apex up: inside when below the two slanted edges and above the base
    return (dy <= radius * 0.8) & (2 * np.abs(dx) <= (dy + radius))


def _render(items: list[tuple[str, str, float, float, float]], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw (colour, shape, cx, cy, radius) items on a noisy light background."""
    canvas = np.full((size, size, 3), 235.0) + rng.normal(0, 12, (size, size, 3))
    for colour, shape, cx, cy, radius in items:
        rgb = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 14, 3)
        canvas[_shape_mask(shape, size, cx, cy, radius)] = rgb
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _random_item(colour: str, size: int, x_range: tuple[float, float], rng: np.random.Generator,
                 shapes: tuple[str, ...] = SHAPES, height: int | None = None):
    """An item of ``colour`` with a shape from ``shapes``, inside the image's top ``height`` rows."""
    height = size if height is None else height
    radius = rng.uniform(0.16, 0.24) * size
    cx = rng.uniform(x_range[0] * size + radius, x_range[1] * size - radius)
    cy = rng.uniform(radius, height - radius)
    return colour, str(rng.choice(shapes)), cx, cy, radius


def _glyph_strip(image: Image.Image, qualifier: str) -> Image.Image:
    """Draw the describing word at the image's bottom: one dark/light pattern of 8 cells per word."""
    pixels = np.asarray(image).copy()
    size = pixels.shape[1]
    code = (FRAGILE + STURDY).index(qualifier) + 1  # 1..8: never the all-light pattern
    cells = [(code >> bit) & 1 for bit in range(4)] + [1 - ((code >> bit) & 1) for bit in range(4)]
    width = size // len(cells)
    for i, dark in enumerate(cells):
        pixels[-STRIP_HEIGHT:, i * width:(i + 1) * width] = 30 if dark else 225
    return Image.fromarray(pixels)


def _note(qualifier: str, rng: np.random.Generator, neutral: str | None = None) -> str:
    neutral = str(rng.choice(NEUTRAL)) if neutral is None else neutral
    words = [str(rng.choice(SUBJECTS)), str(rng.choice(VERBS)), qualifier, "and", neutral]
    if rng.random() < 0.5:  # word order varies so that position alone does not give the qualifier away
        words[2], words[4] = words[4], words[2]
    return " ".join(words)


SOURCE = "synthetic"


def _sample(image, text, question, answer, label, options, task) -> dict:
    return {
        "image": image, "text": text, "question": question, "answer": answer, "label": int(label),
        "options": options, "has_image": image is not None, "has_text": text is not None,
        "task": task, "source": SOURCE,
    }


def classification_sample(rng: np.random.Generator, size: int, cues: Cues = Cues()) -> dict:
    colour = str(rng.choice(list(COLOURS)))
    warm, sturdy = colour in WARM, bool(rng.random() < 0.5)
    qualifier = str(rng.choice(STURDY if sturdy else FRAGILE))
    label = 2 * (not warm) + int(sturdy)
    shape_hint = rng.random() < Cues.hint_probability(cues.image_share)
    shapes = (STURDY_SHAPES if sturdy else FRAGILE_SHAPES) if shape_hint else SHAPES
    height = size - STRIP_HEIGHT if cues.text_in_image else size
    image = _render([_random_item(colour, size, (0.0, 1.0), rng, shapes, height)], size, rng)
    if cues.text_in_image:
        image = _glyph_strip(image, qualifier)
    word_hint = rng.random() < Cues.hint_probability(cues.text_share)
    note = _note(qualifier, rng, str(rng.choice(WARM_HINTS if warm else COOL_HINTS)) if word_hint else None)
    return _sample(image, note, CLASS_QUESTION, OPTION_LETTERS[label], label, list(CLASS_OPTIONS), "classification")


def vqa_sample(rng: np.random.Generator, size: int, cues: Cues = Cues()) -> dict:
    left, right = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    points_right = bool(rng.random() < 0.5)
    side = str(rng.choice(RIGHT if points_right else LEFT))
    target = right if points_right else left
    image = _render([_random_item(left, size, (0.0, 0.5), rng), _random_item(right, size, (0.5, 1.0), rng)],
                    size, rng)
    text = POINTING_NOTE.format(side=side)
    return _sample(image, text, VQA_QUESTION, target, list(COLOURS).index(target), [], "vqa")


def textqa_sample(rng: np.random.Generator, size: int, cues: Cues = Cues()) -> dict:
    sturdy = bool(rng.random() < 0.5)
    note = _note(str(rng.choice(STURDY if sturdy else FRAGILE)), rng)
    return _sample(None, note, TEXTQA_QUESTION, "yes" if sturdy else "no", int(sturdy), [], "vqa")


# The pre-training question kinds, by the start of their question (``pretrain_kind`` tells them apart): the
# tiny preset's build records its held-out accuracy per kind, and a test checks the shipped preset on each.
PRETRAIN_KINDS = {
    "colour": "What colour is the",  # the colour word of one side's item (image)
    "shape": "What shape is the",  # the shape word of one side's item (image)
    "note_word": "Which word in the note",  # the note's describing word (text)
    "colour_option": "Which colour is the",  # option letter over colours (image)
    "sturdiness": "Is the parcel fragile",  # fragile or sturdy, what the note's word means (text)
    "temperature": "Is the colour of the",  # warm or cool, the item's colour temperature (image)
    "cross_modal": "Which fits the",  # option letter: a shape (image) and a note's word (text) together
    "letter_format": "Which option is",  # option letter naming an option (neither modality)
}


def pretrain_kind(question: str) -> str:
    """The ``PRETRAIN_KINDS`` name of a pre-training question."""
    for kind, start in PRETRAIN_KINDS.items():
        if question.startswith(start):
            return kind
    raise ValueError(f"not a pre-training question: {question!r}")


def pretrain_sample(rng: np.random.Generator, size: int, cues: Cues = Cues()) -> dict:
    """Generic perception and format questions, disjoint from the downstream tasks, over every mix of
    modalities a client may hold: image and note, image only, note only, and neither. A question is
    always answerable from what is given; the other modality, when present, is a distractor."""
    left, right = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    # Half the images hold one item anywhere, as the classification images do; the other half two, left and
    # right, where the question also asks the model to tell the sides apart.
    if rng.random() < 0.5:
        items = [_random_item(left, size, (0.0, 1.0), rng)]
        side, where = 0, "item"
    else:
        items = [_random_item(left, size, (0.0, 0.5), rng), _random_item(right, size, (0.5, 1.0), rng)]
        side = int(rng.integers(2))
        where = ("left", "right")[side] + " item"
    image = _render(items, size, rng)
    colour, shape = items[side][0], items[side][1]
    qualifier = str(rng.choice(FRAGILE + STURDY))
    note = _note(qualifier, rng)
    with_other = bool(rng.random() < 0.5)  # whether the modality the question does not need is there too
    kind = rng.integers(8)
    if kind == 0:  # colour of one item, from the image
        return _sample(image, note if with_other else None, f"What colour is the {where}?", colour, 0, [], "vqa")
    if kind == 1:  # shape of one item, from the image
        return _sample(image, note if with_other else None, f"What shape is the {where}?", shape, 0, [], "vqa")
    if kind == 2:  # the describing word of a note, from the text
        return _sample(image if with_other else None, note, "Which word in the note describes the parcel?",
                       qualifier, 0, [], "vqa")
    if kind == 3:  # option-letter format over colours, from the image
        options = [str(c) for c in rng.choice(list(COLOURS), size=4, replace=False)]
        if colour not in options:
            options[int(rng.integers(4))] = colour
        answer = options.index(colour)
        return _sample(image, note if with_other else None, f"Which colour is the {where}?",
                       OPTION_LETTERS[answer], answer, options, "classification")
    if kind == 4:  # what a note's word means, from the text
        return _sample(image if with_other else None, note, "Is the parcel fragile or sturdy?",
                       "sturdy" if qualifier in STURDY else "fragile", 0, [], "vqa")
    if kind == 5:  # colour temperature, general knowledge a real MLLM brings, from the image
        return _sample(image, note if with_other else None, f"Is the colour of the {where} warm or cool?",
                       "warm" if colour in WARM else "cool", 0, [], "vqa")
    if kind == 6:  # one fact from each modality in one option: the shape and the note's literal word
        truth = f"{shape} {qualifier}"
        options = list(dict.fromkeys([truth] + [f"{rng.choice(SHAPES)} {rng.choice(FRAGILE + STURDY)}"
                                                for _ in range(8)]))[:4]
        order = rng.permutation(len(options))
        options = [options[i] for i in order]
        answer = options.index(truth)
        return _sample(image, note, f"Which fits the {where}'s shape and the note's word?",
                       OPTION_LETTERS[answer], answer, options, "classification")
    # neither modality: the option-letter format itself (which letter holds the named option)
    options = [str(c) for c in rng.choice(list(COLOURS), size=4, replace=False)]
    answer = int(rng.integers(4))
    return _sample(None, None, f"Which option is {options[answer]}?", OPTION_LETTERS[answer], answer, options,
                   "classification")


GENERATORS = {"classification": classification_sample, "vqa": vqa_sample, "pretrain": pretrain_sample,
              "textqa": textqa_sample}


def generate(task: str, num_samples: int, split: str, seed: int, image_size: int = 32,
             cues: Cues = Cues()) -> datasets.Dataset:
    """``num_samples`` samples of ``task``; each split draws from its own seeded stream."""
    if task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(GENERATORS)}")
    if split not in SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_STREAMS)}")
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], list(GENERATORS).index(task)])
    rows = [GENERATORS[task](rng, image_size, cues) for _ in range(num_samples)]
    columns = {key: [row[key] for row in rows] for key in FEATURES}
    columns["source"] = [f"{SOURCE}/{task}"] * num_samples  # per task: mixed test splits are scored per source
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def client_sample(task: str, seed: int, client: int, row: int, image_size: int = 32, cues: Cues = Cues(),
                  label: int | None = None) -> dict:
    """Row ``row`` of client ``client``'s own training data (``data.samples_per_client``).

    Its generator is seeded by (seed, task, client, row) alone, so any row of any client costs O(1) to
    derive, on any worker, whatever the number of clients. With ``label``, the first draw from that generator
    with that label: a sample from the task's distribution conditioned on the label (label skew)."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS["train"], list(GENERATORS).index(task), client, row])
    while True:
        sample = GENERATORS[task](rng, image_size, cues)
        if label is None or sample["label"] == label:
            return {**sample, "source": f"{SOURCE}/{task}"}


def load_synthetic(task: str, num_train: int, num_test: int, image_size: int, seed: int,
                   cues: Cues = Cues()) -> DatasetSplits:
    return DatasetSplits(
        train=generate(task, num_train, "train", seed, image_size, cues),
        test=generate(task, num_test, "test", seed, image_size, cues),
        num_classes=TASK_NUM_CLASSES[task],
        task="classification" if task == "classification" else "vqa",
    )

