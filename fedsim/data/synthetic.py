"""Procedurally generated image + text benchmark, deterministic by seed.

Every answer needs BOTH modalities, and each modality alone still carries part of it:

- ``classification``: one coloured shape in the image, a note in the text. The class is
  (warm or cool colour, from the image) x (fragile or sturdy parcel, from a synonym in the text):
  4 options, chance 25%, either modality alone caps accuracy at 50%.
- ``vqa``: two shapes of different colours, left and right; the note says which one is meant (with
  synonyms); the answer is that item's colour word. Without text 50%, without image 1/6.
- ``textqa``: text only, a yes/no question about a note ("Can other parcels be stacked on it?": yes when
  the parcel is sturdy); the text-only QA clients' task in the ``modality_task`` scenario.
- ``pretrain``: generic questions (colour of the left/right item, its shape, the describing word of a
  note, option-letter answers) used only to pre-train the tiny preset, never for client data.
"""

from __future__ import annotations

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


def _random_item(colour: str, size: int, x_range: tuple[float, float], rng: np.random.Generator):
    radius = rng.uniform(0.16, 0.24) * size
    cx = rng.uniform(x_range[0] * size + radius, x_range[1] * size - radius)
    cy = rng.uniform(radius, size - radius)
    return colour, str(rng.choice(SHAPES)), cx, cy, radius


def _note(qualifier: str, rng: np.random.Generator) -> str:
    words = [str(rng.choice(SUBJECTS)), str(rng.choice(VERBS)), qualifier, "and", str(rng.choice(NEUTRAL))]
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


def classification_sample(rng: np.random.Generator, size: int) -> dict:
    colour = str(rng.choice(list(COLOURS)))
    sturdy = bool(rng.random() < 0.5)
    qualifier = str(rng.choice(STURDY if sturdy else FRAGILE))
    label = 2 * (colour not in WARM) + int(sturdy)
    image = _render([_random_item(colour, size, (0.0, 1.0), rng)], size, rng)
    return _sample(image, _note(qualifier, rng), CLASS_QUESTION, OPTION_LETTERS[label], label,
                   list(CLASS_OPTIONS), "classification")


def vqa_sample(rng: np.random.Generator, size: int) -> dict:
    left, right = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    points_right = bool(rng.random() < 0.5)
    side = str(rng.choice(RIGHT if points_right else LEFT))
    target = right if points_right else left
    image = _render([_random_item(left, size, (0.0, 0.5), rng), _random_item(right, size, (0.5, 1.0), rng)],
                    size, rng)
    text = POINTING_NOTE.format(side=side)
    return _sample(image, text, VQA_QUESTION, target, list(COLOURS).index(target), [], "vqa")


def textqa_sample(rng: np.random.Generator, size: int) -> dict:
    sturdy = bool(rng.random() < 0.5)
    note = _note(str(rng.choice(STURDY if sturdy else FRAGILE)), rng)
    return _sample(None, note, TEXTQA_QUESTION, "yes" if sturdy else "no", int(sturdy), [], "vqa")


def pretrain_sample(rng: np.random.Generator, size: int) -> dict:
    """Generic perception and format questions, disjoint from the downstream tasks."""
    left, right = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    items = [_random_item(left, size, (0.0, 0.5), rng), _random_item(right, size, (0.5, 1.0), rng)]
    image = _render(items, size, rng)
    kind = rng.integers(5)
    if kind == 0:  # colour of one side
        side = int(rng.integers(2))
        return _sample(image, None, f"What colour is the {('left', 'right')[side]} item?",
                       (left, right)[side], 0, [], "vqa")
    if kind == 1:  # shape of one side
        side = int(rng.integers(2))
        return _sample(image, None, f"What shape is the {('left', 'right')[side]} item?",
                       items[side][1], 0, [], "vqa")
    if kind == 2:  # read the describing word of a note
        qualifier = str(rng.choice(FRAGILE + STURDY))
        return _sample(None, _note(qualifier, rng), "Which word in the note describes the parcel?",
                       qualifier, 0, [], "vqa")
    if kind == 3:  # option-letter format over colours
        options = [str(c) for c in rng.choice(list(COLOURS), size=4, replace=False)]
        side = int(rng.integers(2))
        if (left, right)[side] not in options:
            options[int(rng.integers(4))] = (left, right)[side]
        answer = options.index((left, right)[side])
        return _sample(image, None, f"Which colour is the {('left', 'right')[side]} item?",
                       OPTION_LETTERS[answer], answer, options, "classification")
    # option-letter format over a note's meaning
    qualifier = str(rng.choice(FRAGILE + STURDY))
    options = ["fragile", "sturdy"] if rng.random() < 0.5 else ["sturdy", "fragile"]
    answer = options.index("sturdy" if qualifier in STURDY else "fragile")
    return _sample(None, _note(qualifier, rng), "Is the parcel fragile or sturdy?",
                   OPTION_LETTERS[answer], answer, options, "classification")


GENERATORS = {"classification": classification_sample, "vqa": vqa_sample, "pretrain": pretrain_sample,
              "textqa": textqa_sample}


def generate(task: str, num_samples: int, split: str, seed: int, image_size: int = 32) -> datasets.Dataset:
    """``num_samples`` samples of ``task``; each split draws from its own seeded stream."""
    if task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(GENERATORS)}")
    if split not in SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_STREAMS)}")
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], list(GENERATORS).index(task)])
    rows = [GENERATORS[task](rng, image_size) for _ in range(num_samples)]
    columns = {key: [row[key] for row in rows] for key in FEATURES}
    columns["source"] = [f"{SOURCE}/{task}"] * num_samples  # per task: mixed test splits are scored per source
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def load_synthetic(task: str, num_train: int, num_test: int, image_size: int, seed: int) -> DatasetSplits:
    return DatasetSplits(
        train=generate(task, num_train, "train", seed, image_size),
        test=generate(task, num_test, "test", seed, image_size),
        num_classes=TASK_NUM_CLASSES[task],
        task="classification" if task == "classification" else "vqa",
    )

