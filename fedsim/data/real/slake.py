"""SLAKE 1.0 (Liu et al., 2021): bilingual medical VQA on radiology images; English questions only, accuracy.

Layout (data.path, the Slake1.0 folder):
    train.json            a JSON list of {"img_id", "img_name": "xmlab102/source.jpg", "question", "answer",
                          "q_lang": "en" or "zh", "answer_type", "content_type", "qid", ...}
    test.json             the same fields; the test split
    imgs/                 the images, imgs/<img_name>
    Only rows with q_lang "en" are kept. train = train.json only: validate.json (validation.json on the hub)
    is the source's model-selection split and is not read.

Hub (data.hub): e.g. BoKelvin/SLAKE, the JSON files above as splits train, test (columns img_name, question,
    answer, q_lang, ...) with the images in the repository's imgs.zip, which is downloaded and unpacked once
    into the datasets cache (refused if a member's path leaves the folder or the archive is over the size
    bounds of fedsim.data.real.base.unpack_archive). A hub copy with an image column (image) is used as is.

Each row: image, text None, question and answer as in the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from fedsim.data.real.base import (RealDataset, hub_images, image_file, load_hub_split, open_row,
                                   read_json, register, require_columns, unpack_hub_archive)

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

IMAGE_DIR = "imgs"
FIELDS = ("img_name", "question", "answer", "q_lang")
HUB_IMAGE_ARCHIVE = "imgs.zip"


@register
class Slake(RealDataset):
    name = "slake"
    task = "vqa"
    metric = "accuracy"
    required = ("train.json", "test.json", f"{IMAGE_DIR}/")
    hub_example = "BoKelvin/SLAKE"

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        return {split: [open_row(self.name, item["question"], item["answer"],
                                 image=image_file(root / IMAGE_DIR / item["img_name"]))
                        for item in self.fields(read_json(root / f"{split}.json"), FIELDS, root / f"{split}.json")
                        if item["q_lang"] == "en"]
                for split in ("train", "test")}

    def hub_rows(self, hub: str, seed: int, revision: Optional[str] = None) -> dict[str, list[dict]]:
        splits = {split: load_hub_split(hub, self.hub_config, names, revision)
                  for split, names in self.hub_splits.items()}
        image_root = None
        if "image" not in splits["train"].column_names:
            unpacked = unpack_hub_archive(hub, HUB_IMAGE_ARCHIVE, revision)
            image_root = unpacked / IMAGE_DIR if (unpacked / IMAGE_DIR).is_dir() else unpacked
        return {split: self.map_hub(ds, image_root) for split, ds in splits.items()}

    def map_hub(self, ds: datasets.Dataset, image_root: Optional[Path] = None) -> list[dict]:
        """Rows of a hub split: images from its ``image`` column, else ``image_root / img_name``."""
        require_columns(ds, ("question", "answer"), self.name)
        if "image" in ds.column_names:
            images = hub_images(ds, "image")
        else:
            require_columns(ds, ("img_name",), self.name)
            if image_root is None:
                raise ValueError(f"hub split for dataset {self.name!r} has no image column; pass the folder of "
                                 "its unpacked images as image_root")
            images = [image_file(image_root / name) for name in ds["img_name"]]
        langs = ds["q_lang"] if "q_lang" in ds.column_names else ["en"] * len(ds)
        return [open_row(self.name, question, answer, image=image)
                for image, question, answer, lang in zip(images, ds["question"], ds["answer"], langs)
                if lang == "en" and image is not None]
