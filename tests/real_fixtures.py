"""Tiny fixture folders of each real dataset, in the source's own format (no network).

Shared by the adapter tests (test_real_datasets.py) and the shipped-config tests (test_shipped_configs.py),
which stand them in for the data folders that the GPU configs point at.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from fedsim.data.real.crisismmd import MERGED

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
           (120, 120, 120), (250, 250, 250), (10, 10, 10), (90, 40, 160)]


def write_image(path: Path, i: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLOURS[i % len(COLOURS)]).save(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


# -- fixtures in each source's format ---------------------------------------------------------------------


def make_hateful_memes(root: Path) -> None:
    for split, ids in (("train", range(6)), ("dev_seen", range(10, 13))):
        lines = []
        for i in ids:
            write_image(root / "img" / f"{i:05d}.png", i)
            lines.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": i % 2, "text": f"meme text {i}"}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "test_seen.jsonl").write_text(json.dumps({"id": 99, "img": "img/00099.png", "text": "no label"}) + "\n")


def make_hateful_memes_test_seen(root: Path) -> None:
    """The final release: test_seen.jsonl carries labels."""
    make_hateful_memes(root)
    lines = []
    for i in range(20, 24):
        write_image(root / "img" / f"{i:05d}.png", i)
        lines.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": int(i >= 22), "text": f"seen {i}"}))
    (root / "test_seen.jsonl").write_text("\n".join(lines) + "\n")


CRISIS_HEADER = ["event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text", "label_image",
                 "label_text_image"]
CRISIS_TRAIN = [("rescue_volunteering_or_donation_effort", "Volunteers needed at the shelter"),
                ("not_humanitarian", 'He said "what a storm'),  # a stray quote must not swallow the next line
                ("infrastructure_and_utility_damage", "Bridge washed out"),
                ("vehicle_damage", "Cars burned"),  # a fine class, merged
                ("other_relevant_information", "Tornado watch for three counties"),
                ("affected_individuals", "Families displaced")]
CRISIS_TEST = [("not_humanitarian", "Good morning"), ("affected_individuals", "Four injured")]


def make_crisismmd(root: Path) -> None:
    for split, items in (("train", CRISIS_TRAIN), ("dev", CRISIS_TEST), ("test", CRISIS_TEST)):
        lines = ["\t".join(CRISIS_HEADER)]
        for i, (label, text) in enumerate(items):
            tweet = f"{split}{i}"
            image = f"data_image/hurricane_harvey/10_9_2017/{tweet}_0.jpg"
            write_image(root / image, i)
            merged = MERGED.get(label, label)
            lines.append("\t".join(["hurricane_harvey", tweet, f"{tweet}_0", text, image, label, merged, merged,
                                    "Positive"]))
        path = root / "crisismmd_datasplit_agreed_label" / f"task_humanitarian_text_img_agreed_lab_{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# crisismmd_datasplit_all: (label_image, label_text, tweet_text); the labels need not agree
CRISIS_ALL_TRAIN = [("injured_or_dead_people", "affected_individuals", "Two hurt https://t.co/abc"),
                    ("vehicle_damage", "vehicle_damage", "Cars burned"),
                    ("missing_or_found_people", "missing_or_found_people", "Boy found"),
                    ("not_humanitarian", "rescue_volunteering_or_donation_effort", "Donate http://x.co/1 now"),
                    ("other_relevant_information", "other_relevant_information", "Tornado watch"),
                    ("affected_individuals", "not_humanitarian", "Families displaced"),
                    ("infrastructure_and_utility_damage", "infrastructure_and_utility_damage", "Bridge out"),
                    ("rescue_volunteering_or_donation_effort", "not_humanitarian", 'Volunteers "needed')]
CRISIS_ALL_TEST = [("vehicle_damage", "not_humanitarian", "Truck flipped"),
                   ("missing_or_found_people", "affected_individuals", "Still missing")]


def make_crisismmd_all(root: Path) -> None:
    for split, items in (("train", CRISIS_ALL_TRAIN), ("dev", CRISIS_ALL_TEST), ("test", CRISIS_ALL_TEST)):
        lines = ["\t".join(CRISIS_HEADER)]
        for i, (label_image, label_text, text) in enumerate(items):
            tweet = f"{split}{i}"
            image = f"data_image/hurricane_irma/9_9_2017/{tweet}_0.jpg"
            write_image(root / image, i)
            lines.append("\t".join(["hurricane_irma", tweet, f"{tweet}_0", text, image, label_text, label_text,
                                    label_image, "Negative" if label_text != label_image else "Positive"]))
        path = root / "crisismmd_datasplit_all" / f"task_humanitarian_text_img_{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


VQA_RAD_ITEMS = [
    ("synpic1.jpg", "Is there a fracture?", "yes", "freeform"),
    ("synpic1.jpg", "Is a bone broken?", "Yes", "para"),
    ("synpic2.jpg", "How many lesions are seen?", 2, "freeform"),
    ("synpic3.jpg", "What organ is shown?", "lung", "freeform"),
    ("synpic3.jpg", "Which organ is this?", "lung", "test_freeform"),
    ("synpic2.jpg", "Is there a mass?", "no", "test_para"),
]


def make_vqa_rad(root: Path) -> None:
    for i, name in enumerate(("synpic1.jpg", "synpic2.jpg", "synpic3.jpg")):
        write_image(root / "VQA_RAD Image Folder" / name, i)
    write_json(root / "VQA_RAD Dataset Public.json",
                [{"qid": i, "image_name": img, "question": q, "answer": a, "answer_type": "CLOSED",
                  "phrase_type": phrase, "question_type": "PRES", "image_organ": "CHEST"}
                 for i, (img, q, a, phrase) in enumerate(VQA_RAD_ITEMS)])


def _slake_item(qid: int, img: int, question: str, answer: str, lang: str = "en") -> dict:
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
            "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


def make_slake(root: Path) -> None:
    for img in range(3):
        write_image(root / "imgs" / f"xmlab{img}" / "source.jpg", img)
    write_json(root / "train.json", [
        _slake_item(1, 0, "What modality is used to take this image?", "CT"),
        _slake_item(2, 0, "这张图片使用了什么模态？", "CT", lang="zh"),
        _slake_item(3, 1, "Which organ is abnormal?", "Lung"),
        _slake_item(4, 1, "Does the picture contain liver?", "No"),
        _slake_item(5, 2, "Where is the abnormality?", "Left Lung"),
    ])
    write_json(root / "validate.json", [_slake_item(6, 2, "Is this a CT?", "Yes")])
    write_json(root / "test.json", [_slake_item(7, 2, "What is the largest organ?", "Liver"),
                                     _slake_item(8, 2, "最大的器官是什么？", "肝脏", lang="zh")])


def make_medalpaca(root: Path) -> None:
    cards = [{"instruction": "Answer this question truthfully", "input": f"What does marker {i} indicate?",
              "output": f"Condition {i}."} for i in range(20)]
    cards.insert(3, {"instruction": "Answer this question truthfully", "input": "", "output": "orphan answer"})
    write_json(root / "medical_meadow_wikidoc_medical_flashcards.json", cards)


SCIENCEQA_PROBLEMS = {
    "1": {"question": "Which animal's mouth is adapted to tear meat?", "choices": ["sheep", "wolf", "horse"],
          "answer": 1, "hint": "Look at the picture.", "image": "image.png", "split": "train"},
    "2": {"question": "Which is a solid?", "choices": ["milk", "rock"], "answer": 1, "hint": "",
          "image": "image.png", "split": "train"},
    "3": {"question": "Which word comes first?", "choices": ["apple", "pear"], "answer": 0, "hint": "",
          "image": None, "split": "train"},
    "4": {"question": "Which state is highlighted?", "choices": ["Ohio", "Iowa", "Utah", "Idaho", "Maine"],
          "answer": 4, "hint": "", "image": "image.png", "split": "train"},
    "5": {"question": "Which is a mammal?", "choices": ["cat", "frog"], "answer": 0, "hint": "",
          "image": "image.png", "split": "val"},
    "6": {"question": "What is the capital of Texas?", "choices": ["Austin", "Dallas", "Houston"], "answer": 0,
          "hint": "Texas is a state.", "image": "image.png", "split": "test"},
    "7": {"question": "Which magnet pair attracts?", "choices": ["pair 1", "pair 2"], "answer": 1, "hint": "",
          "image": "image.png", "split": "test"},
}


def make_scienceqa(root: Path) -> None:
    for i, (pid, item) in enumerate(SCIENCEQA_PROBLEMS.items()):
        item = dict(item, task="closed choice", grade="grade3", subject="natural science", lecture="", solution="")
        if item["image"]:
            write_image(root / "images" / item["split"] / pid / "image.png", i)
    write_json(root / "problems.json", SCIENCEQA_PROBLEMS)
    write_json(root / "pid_splits.json", {"train": ["1", "2", "3", "4"], "val": ["5"], "test": ["6", "7"]})


BUILDERS = {"hateful_memes": make_hateful_memes, "hateful_memes_test_seen": make_hateful_memes_test_seen,
            "crisismmd": make_crisismmd, "crisismmd_all": make_crisismmd_all, "vqa_rad": make_vqa_rad,
            "slake": make_slake, "medalpaca": make_medalpaca, "scienceqa": make_scienceqa}


def make_dataset(name: str, root: Path) -> Path:
    """A fixture folder of real dataset ``name`` at ``root`` (created), returned."""
    root.mkdir(parents=True, exist_ok=True)
    BUILDERS[name](root)
    return root
