"""The one sample schema that every dataset in fedsim produces (synthetic benchmark and real adapters)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets


@functools.cache
def features() -> datasets.Features:
    """The common schema, built on first use."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),  # None when the sample has no image
        "text": datasets.Value("string"),  # context text (caption, note, meme text); None when absent
        "question": datasets.Value("string"),  # the instruction; always present
        "answer": datasets.Value("string"),  # target string (an option letter for multiple choice)
        "label": datasets.Value("int64"),  # class index (multiple choice) or answer-class index (VQA)
        "options": datasets.List(datasets.Value("string")),  # option texts, empty for open questions
        "has_image": datasets.Value("bool"),
        "has_text": datasets.Value("bool"),
        "task": datasets.Value("string"),  # "classification" | "vqa"
        "source": datasets.Value("string"),  # dataset name, so mixed-source clients stay traceable
    })


OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class DatasetSplits:
    """A benchmark as the engine consumes it."""

    train: datasets.Dataset
    test: datasets.Dataset
    num_classes: int  # options of a multiple-choice task (the most any row has); answer classes for VQA
    task: str  # "classification" | "vqa"
    metric: str = "accuracy"  # the headline metric, as the source's benchmark reports it


def check_schema(ds: datasets.Dataset, name: str) -> None:
    """Fail early when a dataset does not follow features()."""
    missing = set(features()) - set(ds.column_names)
    if missing:
        raise ValueError(f"dataset {name!r} lacks schema columns {sorted(missing)}; expected {list(features())}")
