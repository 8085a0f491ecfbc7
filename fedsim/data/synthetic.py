"""Procedurally generated image + text benchmark, deterministic by seed.

The main task needs both modalities for its best answer, and each modality alone carries graded evidence
about all of it, as in real data, where modalities are partly redundant and partly noisy:

- ``classification``: one coloured item in the image, a note in the text. The class is (warm or cool)
  x (fragile or sturdy): 4 options, chance 25%. Each modality carries one attribute reliably and the
  other weakly (``Cues``), through cues the pre-trained tiny preset perceives: the image shows the
  temperature through the item's colour (right with probability ``cue_reliability``) and the sturdiness
  through its size (a large item is sturdy, right with a probability set by ``image_share``); the note
  gives the sturdiness through its describing word (right with ``cue_reliability``) and the temperature
  through a weather word (sunny, icy, ...; right with a probability set by ``text_share``). Every cue is
  always present and independent given the class, so the Bayes ceilings follow from the generator
  (``Cues.bayes_accuracy``): with the defaults 88.4% with both modalities, 66% with either alone, 25%
  with neither. With ``text_in_image`` the note's describing word is also drawn into the image as a glyph
  strip (like a meme's caption), so missing text costs almost nothing.
- ``vqa``: two items of different colours, left and right; the note says which one is meant (with
  synonyms); the answer is that item's colour word. Without text 50%, without image 1/6.
- ``textqa``: text only, a yes/no question about a note ("Can other parcels be stacked on it?": yes when
  the parcel is sturdy); the text-only QA clients' task in the ``modality_task`` scenario.
- ``pretrain``: generic questions used only to pre-train the tiny preset, never for client data, one kind
  per cue the tasks use (``PRETRAIN_KINDS``): an item's colour, colour temperature and size, a note's
  describing word, what it means, and how its weather word feels, asked with the needed modality (half the
  time with the other as a distractor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from fedsim.data.schema import OPTION_LETTERS, DatasetSplits, features

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (250, 130, 20),
    "yellow": (225, 205, 30),
    "green": (44, 160, 44),
    "blue": (31, 100, 200),
    "purple": (140, 70, 190),
}
WARM = ("red", "orange", "yellow")
COOL = ("green", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "diamond")
# Each shape's area over radius squared (fedsim's masks), so that a size class means an area whatever the shape.
SHAPE_AREA = {"circle": np.pi, "square": 4 * 0.85**2, "triangle": 1.62, "diamond": 2.0}
# An item's area as a fraction of its region (the image, or its half of it), by size class: random
# patch features see the difference (about 3x) where they do not see shape.
SIZE_AREA = {"small": (0.045, 0.07), "large": (0.14, 0.19)}
FRAGILE = ("fragile", "delicate", "brittle", "flimsy")
STURDY = ("sturdy", "solid", "robust", "tough")
NEUTRAL = ("old", "new", "heavy", "light", "square", "round", "plain", "used")
# A note's weather word, the text's cue to the class's temperature.
WARM_WEATHER = ("sunny", "toasty", "fiery")
COOL_WEATHER = ("icy", "frosty", "chilly")
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
    """How much of the classification label each modality carries (see the module docstring).

    ``cue_reliability``: P(a modality's main cue is right): the image's colour for the temperature, the
    note's describing word for the sturdiness. ``image_share`` / ``text_share``: the accuracy that modality
    alone reaches (its Bayes ceiling), set through its weak cue's reliability, share / cue_reliability: the
    item's size for the sturdiness, the note's weather word for the temperature."""

    image_share: float = 0.66
    text_share: float = 0.66
    cue_reliability: float = 0.94
    text_in_image: bool = False

    def __post_init__(self) -> None:
        if not 0.5 <= self.cue_reliability <= 1:
            raise ValueError(f"config key 'data.cue_reliability' has invalid value {self.cue_reliability!r}: "
                             "expected a value in [0.5, 1], the probability that a modality's main cue is right")
        low, high = self.cue_reliability / 2, self.cue_reliability
        for key in ("image_share", "text_share"):
            if not low <= getattr(self, key) <= high:
                raise ValueError(f"config key 'data.{key}' has invalid value {getattr(self, key)!r}: expected a "
                                 f"value in [{low:g}, {high:g}] (data.cue_reliability / 2 to data.cue_reliability), "
                                 "the accuracy that modality alone can reach")

    @classmethod
    def from_config(cls, data) -> "Cues":
        """The cues a ``DataConfig`` asks for."""
        return cls(data.image_share, data.text_share, data.cue_reliability, data.text_in_image)

    @property
    def size_reliability(self) -> float:
        """P(the item's size tells the sturdiness right): the image's weak cue."""
        return self.image_share / self.cue_reliability

    @property
    def weather_reliability(self) -> float:
        """P(the note's weather word tells the temperature right): the text's weak cue."""
        return self.text_share / self.cue_reliability

    def bayes_accuracy(self, image: bool = True, text: bool = True) -> float:
        """The best accuracy any model reaches with the given modalities. The cues are independent binary
        signals given the class, so per attribute the best guess follows the most reliable cue present
        (0.5 with none), and the two attributes multiply. A glyph strip repeats the note's word."""
        temperature = [self.cue_reliability] * image + [self.weather_reliability] * text
        sturdiness = ([self.size_reliability] * image + [self.cue_reliability] * text
                      + [self.cue_reliability] * (image and self.text_in_image))
        return max(temperature, default=0.5) * max(sturdiness, default=0.5)


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
                 large: bool | None = None, height: int | None = None):
    """An item of ``colour``, any shape, of the given size class (None: either), inside the image's top
    ``height`` rows and the ``x_range`` fraction of its width: (colour, shape, cx, cy, radius)."""
    height = size if height is None else height
    large = bool(rng.random() < 0.5) if large is None else large
    shape = str(rng.choice(SHAPES))
    area = rng.uniform(*SIZE_AREA["large" if large else "small"]) * size * height * (x_range[1] - x_range[0])
    radius = float(np.sqrt(area / SHAPE_AREA[shape]))
    low, high = x_range[0] * size + radius, x_range[1] * size - radius
    cx = rng.uniform(low, max(low, high))
    cy = rng.uniform(radius, max(radius, height - radius))
    return colour, shape, cx, cy, radius


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


def _right(truth: bool, reliability: float, rng: np.random.Generator) -> bool:
    """A binary cue: ``truth`` with probability ``reliability``, else its opposite."""
    return truth if rng.random() < reliability else not truth


def classification_sample(rng: np.random.Generator, size: int, cues: Cues = Cues()) -> dict:
    warm, sturdy = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    label = 2 * (not warm) + int(sturdy)
    colour = str(rng.choice(WARM if _right(warm, cues.cue_reliability, rng) else COOL))
    large = _right(sturdy, cues.size_reliability, rng)
    qualifier = str(rng.choice(STURDY if _right(sturdy, cues.cue_reliability, rng) else FRAGILE))
    weather = str(rng.choice(WARM_WEATHER if _right(warm, cues.weather_reliability, rng) else COOL_WEATHER))
    height = size - STRIP_HEIGHT if cues.text_in_image else size
    image = _render([_random_item(colour, size, (0.0, 1.0), rng, large, height)], size, rng)
    if cues.text_in_image:
        image = _glyph_strip(image, qualifier)
    note = _note(qualifier, rng, weather)
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


# The pre-training question kinds, by the start of their question (``pretrain_kind`` tells them apart), one
# per cue the tasks use: the tiny preset's build records its held-out accuracy per kind, and a test checks
# the shipped preset on each.
PRETRAIN_KINDS = {
    "colour": "What colour is the",  # the item's colour word (image)
    "temperature": "Is the colour of the",  # warm or cool, the item's colour temperature (image)
    "size": "Is the item large",  # large or small, one item's size (image)
    "note_word": "Which word in the note",  # the note's describing word (text)
    "sturdiness": "Is the parcel fragile",  # fragile or sturdy, what the note's word means (text)
    "weather": "Does the note sound",  # warm or cool, what the note's weather word means (text)
}


def pretrain_kind(question: str) -> str:
    """The ``PRETRAIN_KINDS`` name of a pre-training question."""
    for kind, start in PRETRAIN_KINDS.items():
        if question.startswith(start):
            return kind
    raise ValueError(f"not a pre-training question: {question!r}")


def pretrain_sample(rng: np.random.Generator, size: int, cues: Cues = Cues()) -> dict:
    """Generic perception questions, disjoint from the downstream tasks: each asks about one cue, with the
    modality it needs, and half the time the other modality as a distractor. Every cue varies
    independently of the others (any colour at any size, any word with any weather)."""
    kind = list(PRETRAIN_KINDS)[int(rng.integers(len(PRETRAIN_KINDS)))]
    # One item anywhere, of either size, as the classification images show it. Two-item images (left and
    # right, as in the vqa task) were tried and left out: in 2000 steps the backbone did not learn to tell the
    # sides apart, and its colour answers on one item stayed below 0.7 while it guessed them.
    colour, large = str(rng.choice(list(COLOURS))), bool(rng.random() < 0.5)
    image = _render([_random_item(colour, size, (0.0, 1.0), rng, large)], size, rng)
    qualifier = str(rng.choice(FRAGILE + STURDY))
    weather = str(rng.choice(WARM_WEATHER + COOL_WEATHER + NEUTRAL)) if kind != "weather" else \
        str(rng.choice(WARM_WEATHER + COOL_WEATHER))
    note = _note(qualifier, rng, weather)
    with_other = bool(rng.random() < 0.5)  # whether the modality the question does not need is there too
    if kind in ("colour", "temperature", "size"):
        question = {"colour": "What colour is the item?", "temperature": "Is the colour of the item warm or cool?",
                    "size": "Is the item large or small?"}[kind]
        answer = {"colour": colour, "temperature": "warm" if colour in WARM else "cool",
                  "size": "large" if large else "small"}[kind]
        return _sample(image, note if with_other else None, question, answer, 0, [], "vqa")
    question = {"note_word": "Which word in the note describes the parcel?",
                "sturdiness": "Is the parcel fragile or sturdy?", "weather": "Does the note sound warm or cool?"}[kind]
    answer = {"note_word": qualifier, "sturdiness": "sturdy" if qualifier in STURDY else "fragile",
              "weather": "warm" if weather in WARM_WEATHER else "cool"}[kind]
    return _sample(image if with_other else None, note, question, answer, 0, [], "vqa")


GENERATORS = {"classification": classification_sample, "vqa": vqa_sample, "pretrain": pretrain_sample,
              "textqa": textqa_sample}


def generate(task: str, num_samples: int, split: str, seed: int, image_size: int = 32,
             cues: Cues = Cues()) -> datasets.Dataset:
    """``num_samples`` samples of ``task``; each split draws from its own seeded stream."""
    import datasets

    if task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(GENERATORS)}")
    if split not in SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_STREAMS)}")
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], list(GENERATORS).index(task)])
    rows = [GENERATORS[task](rng, image_size, cues) for _ in range(num_samples)]
    columns = {key: [row[key] for row in rows] for key in features()}
    columns["source"] = [f"{SOURCE}/{task}"] * num_samples  # per task: mixed test splits are scored per source
    return datasets.Dataset.from_dict(columns, features=features())


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


def generate_test(task: str, num_samples: int, seed: int, test_seed: int | None, image_size: int = 32,
                  cues: Cues = Cues()) -> datasets.Dataset:
    """The test split of ``task``: from ``test_seed`` when given (``data.test_seed``), else from ``seed``."""
    return generate(task, num_samples, "test", seed if test_seed is None else test_seed, image_size, cues)


def load_synthetic(task: str, num_train: int, num_test: int, image_size: int, seed: int,
                   cues: Cues = Cues(), test_seed: int | None = None) -> DatasetSplits:
    """Train and test splits of ``task`` (the test split: ``generate_test``)."""
    return DatasetSplits(
        train=generate(task, num_train, "train", seed, image_size, cues),
        test=generate_test(task, num_test, seed, test_seed, image_size, cues),
        num_classes=TASK_NUM_CLASSES[task],
        task="classification" if task == "classification" else "vqa",
    )

