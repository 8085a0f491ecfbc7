"""VQA-RAD (Lau et al., 2018): clinician-written questions on radiology images; open answers, accuracy.

Layout (data.path, the folder of the Open Science Framework release):
    VQA_RAD Dataset Public.json   a JSON list of {"qid", "image_name", "question", "answer", "answer_type"
                                  ("OPEN"/"CLOSED"), "phrase_type", ...}; answers may be numbers
    VQA_RAD Image Folder/         the images, VQA_RAD Image Folder/<image_name>
    The test split is the rows whose phrase_type starts with "test" (test_freeform, test_para: 451 rows),
    the train split all others (freeform, para).

Hub (data.hub): e.g. flaviagiammarino/vqa-rad, columns image, question, answer; splits train, test.

Each row: image, text None, question and answer as in the source (answer as a string).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.data.real.base import (RealDataset, hub_images, image_file, open_row, read_json, register,
                                   require_columns)

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

QUESTIONS_FILE = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"


@register
class VqaRad(RealDataset):
    name = "vqa_rad"
    task = "vqa"
    metric = "accuracy"
    required = (QUESTIONS_FILE, f"{IMAGE_DIR}/")
    hub_example = "flaviagiammarino/vqa-rad"

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        splits: dict[str, list[dict]] = {"train": [], "test": []}
        path = root / QUESTIONS_FILE
        for item in self.fields(read_json(path), ("image_name", "question", "answer", "phrase_type"), path):
            split = "test" if str(item["phrase_type"]).startswith("test") else "train"
            image = image_file(root / IMAGE_DIR / item["image_name"])
            splits[split].append(open_row(self.name, item["question"], item["answer"], image=image))
        return splits

    def map_hub(self, ds: datasets.Dataset) -> list[dict]:
        require_columns(ds, ("image", "question", "answer"), self.name)
        return [open_row(self.name, question, answer, image=image)
                for image, question, answer in zip(hub_images(ds, "image"), ds["question"], ds["answer"])
                if image is not None]
