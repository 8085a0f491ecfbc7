"""ScienceQA (Lu et al., 2022), the problems with an image: multiple choice over 2-5 options, accuracy.

Layout (data.path, the data/scienceqa folder of the official repository):
    problems.json         a JSON object pid -> {"question", "choices": [...], "answer": index into choices,
                          "hint", "image": "image.png" or null, "split": "train"/"val"/"test", ...}
    images/               the images, images/<split>/<pid>/image.png
    Only problems with an image are kept; train = split "train", test = split "test" ("val" is not read).

Hub (data.hub): e.g. derek-thomas/ScienceQA, columns image (None for text-only problems), question, choices,
    answer, hint; splits train -> train, test -> test.

Each row: image, text = hint (None when empty), question, options = choices, answer = the answer's letter.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.data.real.base import (RealDataset, choice_row, hub_images, image_file, read_json,
                                   register, require_columns)

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

PROBLEMS_FILE = "problems.json"
IMAGE_DIR = "images"


@register
class ScienceQA(RealDataset):
    name = "scienceqa"
    task = "classification"
    metric = "accuracy"
    required = (PROBLEMS_FILE, f"{IMAGE_DIR}/")
    hub_example = "derek-thomas/ScienceQA"

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        splits: dict[str, list[dict]] = {"train": [], "test": []}
        path = root / PROBLEMS_FILE
        problems = read_json(path)
        self.fields(list(problems.values()), ("question", "choices", "answer", "image", "split"), path)
        for pid, item in problems.items():
            if not item.get("image") or item.get("split") not in splits:
                continue
            image = image_file(root / IMAGE_DIR / item["split"] / pid / item["image"])
            splits[item["split"]].append(self._row(image, item))
        return splits

    def map_hub(self, ds: datasets.Dataset) -> list[dict]:
        columns = ("question", "choices", "answer", "hint")
        require_columns(ds, ("image",) + columns, self.name)
        items = ds.select_columns(list(columns)).to_list()
        return [self._row(image, item) for image, item in zip(hub_images(ds, "image"), items) if image is not None]

    def _row(self, image, item: dict) -> dict:
        return choice_row(self.name, item["question"], item["choices"], int(item["answer"]), image=image,
                          text=item.get("hint"))
