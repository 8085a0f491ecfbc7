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

``crisismmd_all`` (below) is the FedMLLM form: all pairs (crisismmd_datasplit_all), the eight classes of the
image label.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.data.real.base import (RealDataset, choice_row, hub_images, image_file, read_tsv,
                                   register, require_columns)

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

SPLIT_DIR = "crisismmd_datasplit_agreed_label"
SPLIT_FILES = {split: f"{SPLIT_DIR}/task_humanitarian_text_img_agreed_lab_{split}.tsv" for split in ("train", "test")}
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


def class_index(label: str, classes: dict[str, str] = CLASSES, merged: dict[str, str] = MERGED) -> int:
    """Option index of a source class id (fine classes merged); ValueError for an unknown class."""
    label = merged.get(label.strip(), label.strip())
    if label not in classes:
        raise ValueError(f"crisismmd: unknown humanitarian class {label!r}; expected one of "
                         f"{sorted(classes) + sorted(merged)}")
    return list(classes).index(label)


@register
class CrisisMMD(RealDataset):
    name = "crisismmd"
    task = "classification"
    metric = "macro_f1"
    split_files = SPLIT_FILES
    label_column = "label_text"
    classes: dict[str, str] = CLASSES
    merged: dict[str, str] = MERGED
    required = (SPLIT_FILES["train"], SPLIT_FILES["test"], "data_image/")
    hub_example = "QCRI/CrisisMMD"
    hub_config = "humanitarian"

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        columns = ("tweet_text", "image", self.label_column)
        return {split: [self._row(image_file(root / item["image"]), item["tweet_text"], item[self.label_column])
                        for item in self.fields(read_tsv(root / file), columns, root / file)]
                for split, file in self.split_files.items()}

    def map_hub(self, ds: datasets.Dataset) -> list[dict]:
        import datasets

        require_columns(ds, ("image", "tweet_text", "label"), self.name)
        labels = ds["label"]
        if isinstance(ds.features["label"], datasets.ClassLabel):
            labels = [ds.features["label"].int2str(int(label)) for label in labels]
        return [self._row(image, text, label)
                for image, text, label in zip(hub_images(ds, "image"), ds["tweet_text"], labels)
                if image is not None]

    def clean_tweet(self, tweet: str) -> str:
        return tweet

    def _row(self, image, text, label: str) -> dict:
        return choice_row(self.name, QUESTION, list(self.classes.values()),
                          class_index(label, self.classes, self.merged), image=image, text=self.clean_tweet(text))


ALL_SPLIT_DIR = "crisismmd_datasplit_all"
ALL_SPLIT_FILES = {split: f"{ALL_SPLIT_DIR}/task_humanitarian_text_img_{split}.tsv" for split in ("train", "test")}
# The eight classes in the order of the FedMLLM code's options (gen_data_crisismmd.py, eval_crisismmd.py there).
ALL_CLASSES = {
    "affected_individuals": "affected individuals",
    "infrastructure_and_utility_damage": "infrastructure and utility damage",
    "injured_or_dead_people": "injured or dead people",
    "missing_or_found_people": "missing or found people",
    "rescue_volunteering_or_donation_effort": "rescue, volunteering or donation effort",
    "vehicle_damage": "vehicle damage",
    "other_relevant_information": "other relevant information",
    "not_humanitarian": "not humanitarian",
}
URL = re.compile(r"http\S+")


@register
class CrisisMMDAll(CrisisMMD):
    """CrisisMMD as FedMLLM runs it: all text-image pairs (not only those whose text and image labels
    agree), the image's label among the eight humanitarian classes (none merged), options in the FedMLLM
    code's order, and URLs removed from the tweets as that code does.

    Layout (data.path, the CrisisMMD_v2.0 folder with the full splits unpacked into it):
        crisismmd_datasplit_all/task_humanitarian_text_img_train.tsv
        crisismmd_datasplit_all/task_humanitarian_text_img_test.tsv
            tab-separated, with a header: event_name, tweet_id, image_id, tweet_text, image, label,
            label_text, label_image, label_text_image; the class is label_image
        data_image/           the images, at the relative path in column image (data_image/<event>/<date>/<id>.jpg)
        (the _dev.tsv split is not read)

    Hub (data.hub): e.g. QCRI/CrisisMMD, configuration "humanitarian" (all pairs), columns tweet_text, image,
        label (class names); its eight classes are kept.
    """

    name = "crisismmd_all"
    split_files = ALL_SPLIT_FILES
    label_column = "label_image"
    classes = ALL_CLASSES
    merged: dict[str, str] = {}
    required = (ALL_SPLIT_FILES["train"], ALL_SPLIT_FILES["test"], "data_image/")

    def clean_tweet(self, tweet: str) -> str:
        return URL.sub("", tweet or "").strip()
