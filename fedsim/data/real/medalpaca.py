"""MedAlpaca Medical Meadow flashcards (Han et al., 2023): text-only medical question answering, accuracy.

Layout (data.path, a folder holding the release's one file):
    medical_meadow_wikidoc_medical_flashcards.json
        a JSON list of {"instruction", "input", "output"}: the instruction ("Answer this question
        truthfully"), the flashcard's question, its answer
    There is no official split: the test split is a seeded 10% holdout (numpy
    default_rng([seed, 1]).permutation(n)[:ceil(0.1 n)]), the rest is train. Rows with an empty input or
    output are dropped.

Hub (data.hub): e.g. medalpaca/medical_meadow_medical_flashcards, columns instruction, input, output; its one
    split train is held out the same way.

Each row: image None, text = input (the flashcard's question), question = instruction, answer = output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from fedsim.data.real.base import (RealDataset, holdout, load_hub_split, open_row, read_json, register,
                                   require_columns)

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

log = logging.getLogger("fedsim.data")

FLASHCARDS_FILE = "medical_meadow_wikidoc_medical_flashcards.json"
TEST_FRACTION = 0.1


@register
class MedAlpaca(RealDataset):
    name = "medalpaca"
    task = "vqa"
    metric = "accuracy"
    required = (FLASHCARDS_FILE,)
    hub_example = "medalpaca/medical_meadow_medical_flashcards"
    text_only = True

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        path = root / FLASHCARDS_FILE
        return self._split(self._rows(self.fields(read_json(path), ("instruction", "input", "output"), path)), seed)

    def hub_rows(self, hub: str, seed: int, revision: Optional[str] = None) -> dict[str, list[dict]]:
        return self._split(self.map_hub(load_hub_split(hub, self.hub_config, ("train",), revision)), seed)

    def map_hub(self, ds: datasets.Dataset) -> list[dict]:
        require_columns(ds, ("instruction", "input", "output"), self.name)
        return self._rows(ds.select_columns(["instruction", "input", "output"]).to_list())

    def _rows(self, items: list[dict]) -> list[dict]:
        rows = [open_row(self.name, item["instruction"], item["output"], text=item["input"])
                for item in items if str(item.get("input") or "").strip() and str(item.get("output") or "").strip()]
        if len(rows) < len(items):
            log.info("%s: dropped %d of %d flashcards with an empty input or output",
                     self.name, len(items) - len(rows), len(items))
        return rows

    @staticmethod
    def _split(rows: list[dict], seed: int) -> dict[str, list[dict]]:
        train, test = holdout(rows, TEST_FRACTION, seed)
        return {"train": train, "test": test}
