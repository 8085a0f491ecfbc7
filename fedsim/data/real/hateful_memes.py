"""Facebook Hateful Memes (Kiela et al., 2020): is a meme hateful? Two options; the headline metric is AUROC.

Layout (data.path, the folder of the official release):
    img/                  the meme images, e.g. img/01235.png
    train.jsonl           one JSON object a line: {"id", "img": "img/01235.png", "label": 0 or 1, "text"}
    dev_seen.jsonl        the same fields; used as the test split (older releases: dev.jsonl)
    (test*.jsonl and dev_unseen.jsonl are not read: the first release's test files carry no labels;
    ``hateful_memes_test_seen`` scores the final release's labelled test_seen.jsonl instead, as FedMLLM does)

Hub (data.hub): e.g. biecho/hateful_memes, columns id, image, text, label (0 not hateful, 1 hateful);
    splits train -> train, dev_seen (or validation) -> test. Rows without an image are dropped.

Each row: image = the meme, text = the meme's overlaid text, question "Is this meme hateful?",
options ["not hateful", "hateful"], answer "A"/"B", label = the source label.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.data.real.base import (RealDataset, choice_row, hub_images, image_file, read_jsonl,
                                   register, require_columns)

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

QUESTION = "Is this meme hateful?"
OPTIONS = ["not hateful", "hateful"]
TEST_FILES = ("dev_seen.jsonl", "dev.jsonl")


@register
class HatefulMemes(RealDataset):
    name = "hateful_memes"
    task = "classification"
    metric = "roc_auc"
    test_files: tuple[str, ...] = TEST_FILES  # the first that exists is the test split
    required = ("img/", "train.jsonl", TEST_FILES)
    hub_example = "biecho/hateful_memes"
    hub_splits = {"train": ("train",), "test": ("dev_seen", "validation")}

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        files = self.resolve(root)
        return {split: [self._row(image_file(root / item["img"]), item["text"], item["label"])
                        for item in self.fields(read_jsonl(files[entry]), ("img", "label", "text"), files[entry])]
                for split, entry in (("train", "train.jsonl"), ("test", self.test_files))}

    def map_hub(self, ds: datasets.Dataset) -> list[dict]:
        require_columns(ds, ("image", "text", "label"), self.name)
        return [self._row(image, text, label)
                for image, text, label in zip(hub_images(ds, "image"), ds["text"], ds["label"])
                if image is not None]

    def _row(self, image, text, label) -> dict:
        return choice_row(self.name, QUESTION, OPTIONS, int(label), image=image, text=text)


@register
class HatefulMemesTestSeen(HatefulMemes):
    """Hateful Memes scored on test_seen, as FedMLLM's evaluation does (eval_hateful.py there reads
    test_seen.jsonl); rows, options and metric as ``hateful_memes``.

    Layout (data.path, the folder of the final release, whose test_seen.jsonl carries labels):
        img/                  the meme images, e.g. img/01235.png
        train.jsonl           one JSON object a line: {"id", "img": "img/01235.png", "label": 0 or 1, "text"}
        test_seen.jsonl       the same fields, labels included; used as the test split
        (dev*.jsonl and test_unseen.jsonl are not read; the first release's test_seen.jsonl has no labels)

    Hub (data.hub): the columns of ``hateful_memes``; splits train -> train, test_seen -> test.
    """

    name = "hateful_memes_test_seen"
    test_files = ("test_seen.jsonl",)
    required = ("img/", "train.jsonl", test_files)
    hub_splits = {"train": ("train",), "test": ("test_seen",)}
