"""CrisisMMD v2.0, humanitarian task on tweet text-image pairs with agreed labels (Ofli et al., 2020); macro-F1.

Layout (data.path, the CrisisMMD_v2.0 folder with the agreed-label splits unpacked into it):
    crisismmd_datasplit_agreed_label/task_humanitarian_text_img_agreed_lab_train.tsv
    crisismmd_datasplit_agreed_label/task_humanitarian_text_img_agreed_lab_test.tsv
        tab-separated, with a header: event_name, tweet_id, image_id, tweet_text, image, label,
        label_text, label_image, label_text_image; the class is label_text (= label_image in these files)
    data_image/           the images, at the relative path in column image (data_image/<event>/<date>/<id>.jpg)
    (the _dev.tsv split is not read)

Hub (data.hub): e.g. QCRI/CrisisMMD, configuration "humanitarian", columns tweet_text, image, label (class
    names); splits train -> train, test -> test. That release holds all text-image pairs, not only the agreed
    ones; its eight classes are merged into the five below as the agreed-label benchmark does.

Each row: image = the tweet's image, text = tweet_text, question "Which humanitarian category does this tweet
belong to?", options = CLASSES (in that order), answer = the letter of the class. The fine classes
injured_or_dead_people / missing_or_found_people count as affected_individuals, vehicle_damage as
infrastructure_and_utility_damage.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from fedsim.data.real.base import (RealDataset, choice_row, hub_images, image_file, read_tsv,
                                   register, require_columns)

SPLIT_DIR = "crisismmd_datasplit_agreed_label"
SPLIT_FILES = {split: f"{SPLIT_DIR}/task_humanitarian_text_img_agreed_lab_{split}.tsv" for split in ("train", "test")}
COLUMNS = ("tweet_text", "image", "label_text")
QUESTION = "Which humanitarian category does this tweet belong to?"
# source class id -> option text; the order is the option order (alphabetical by id)
CLASSES = {
    "affected_individuals": "affected individuals",
    "infrastructure_and_utility_damage": "infrastructure and utility damage",
    "not_humanitarian": "not humanitarian",
    "other_relevant_information": "other relevant information",
    "rescue_volunteering_or_donation_effort": "rescue, volunteering or donation effort",
}
MERGED = {
    "injured_or_dead_people": "affected_individuals",
    "missing_or_found_people": "affected_individuals",
    "vehicle_damage": "infrastructure_and_utility_damage",
}
OPTIONS = list(CLASSES.values())


def class_index(label: str) -> int:
    """Option index of a source class id (fine classes merged); ValueError for an unknown class."""
    label = MERGED.get(label.strip(), label.strip())
    if label not in CLASSES:
        raise ValueError(f"crisismmd: unknown humanitarian class {label!r}; expected one of "
                         f"{sorted(CLASSES) + sorted(MERGED)}")
    return list(CLASSES).index(label)


@register
class CrisisMMD(RealDataset):
    name = "crisismmd"
    task = "classification"
    metric = "macro_f1"
    required = (SPLIT_FILES["train"], SPLIT_FILES["test"], "data_image/")
    hub_example = "QCRI/CrisisMMD"
    hub_config = "humanitarian"

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        return {split: [self._row(image_file(root / item["image"]), item["tweet_text"], item["label_text"])
                        for item in self.fields(read_tsv(root / file), COLUMNS, root / file)]
                for split, file in SPLIT_FILES.items()}

    def map_hub(self, ds: datasets.Dataset) -> list[dict]:
        require_columns(ds, ("image", "tweet_text", "label"), self.name)
        labels = ds["label"]
        if isinstance(ds.features["label"], datasets.ClassLabel):
            labels = [ds.features["label"].int2str(int(label)) for label in labels]
        return [self._row(image, text, label)
                for image, text, label in zip(hub_images(ds, "image"), ds["tweet_text"], labels)
                if image is not None]

    def _row(self, image, text, label: str) -> dict:
        return choice_row(self.name, QUESTION, OPTIONS, class_index(label), image=image, text=text)
