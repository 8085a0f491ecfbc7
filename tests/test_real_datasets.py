"""Real dataset adapters on tiny fixtures in each source's own format (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import shutil
import stat
import zipfile
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest
from PIL import Image

from fedsim.config import DataConfig
from fedsim.data import check_data_source
from fedsim.data.real import REAL_DATASETS, RealDataset
from fedsim.data.real import base as real_base
from fedsim.data.real.crisismmd import OPTIONS as CRISIS_OPTIONS, class_index
from fedsim.data.real.slake import Slake
from fedsim.data.schema import OPTION_LETTERS, features
from fedsim.output import staged_dirs
from real_fixtures import (COLOURS, CRISIS_ALL_TRAIN, CRISIS_TRAIN, SCIENCEQA_PROBLEMS, make_crisismmd,
                           make_crisismmd_all, make_hateful_memes, make_hateful_memes_test_seen, make_medalpaca,
                           make_scienceqa, make_slake, make_vqa_rad, write_image, write_json)


def _pil(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), COLOURS[i % len(COLOURS)])


def _colour(image: Image.Image) -> int:
    """Index of the fixture colour an image was filled with (JPEG shifts a channel by a few levels)."""
    pixel = image.convert("RGB").getpixel((4, 4))
    return min(range(len(COLOURS)), key=lambda i: sum(abs(a - b) for a, b in zip(pixel, COLOURS[i])))


# name -> (builder, train rows, test rows, every row has an image, has_text per train row or one flag, classes)
CASES = {
    "hateful_memes": (make_hateful_memes, 6, 3, True, True, 2),
    "crisismmd": (make_crisismmd, 6, 2, True, True, 5),
    "hateful_memes_test_seen": (make_hateful_memes_test_seen, 6, 4, True, True, 2),
    "crisismmd_all": (make_crisismmd_all, 8, 2, True, True, 8),
    "vqa_rad": (make_vqa_rad, 4, 2, True, False, 3),  # train answers yes, Yes, 2, lung -> {yes, 2, lung}
    "slake": (make_slake, 4, 1, True, False, 4),
    "medalpaca": (make_medalpaca, 18, 2, False, True, 18),
    "scienceqa": (make_scienceqa, 3, 2, True, [True, False, False], 5),
}


def _cfg(name: str, path=None, hub=None, num_train: int = 0, num_test: int = 0) -> DataConfig:
    return DataConfig(dataset=name, path=None if path is None else str(path), hub=hub, num_train=num_train,
                      num_test=num_test)


@pytest.fixture
def source(request, tmp_path: Path) -> tuple[str, Path]:
    name = request.param
    root = tmp_path / name
    root.mkdir()
    CASES[name][0](root)
    return name, root


def _rows(ds: datasets.Dataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# -- every adapter ----------------------------------------------------------------------------------------


def test_registry_matches_the_contract():
    assert set(REAL_DATASETS) == set(CASES)
    for name, adapter in REAL_DATASETS.items():
        assert isinstance(adapter, RealDataset)
        assert adapter.name == name
        assert adapter.task in ("classification", "vqa")
        assert adapter.metric in ("roc_auc", "macro_f1", "accuracy")
        assert adapter.layout.strip()
    assert REAL_DATASETS["hateful_memes"].metric == "roc_auc"
    assert REAL_DATASETS["crisismmd"].metric == "macro_f1"


@pytest.mark.parametrize("source", list(CASES), indirect=True)
def test_load_follows_the_schema(source):
    name, root = source
    _, n_train, n_test, with_image, with_text, num_classes = CASES[name]
    adapter = REAL_DATASETS[name]
    assert adapter.text_only == (not with_image)  # what modality_task's text source check relies on
    adapter.check_source(_cfg(name, root))
    splits = adapter.load(_cfg(name, root), seed=0)

    assert splits.train.features == features() and splits.test.features == features()
    assert (len(splits.train), len(splits.test)) == (n_train, n_test)
    assert splits.task == adapter.task and splits.metric == adapter.metric
    assert splits.num_classes == num_classes
    train = _rows(splits.train)
    for row in train + _rows(splits.test):
        assert row["source"] == name and row["task"] == adapter.task and row["question"]
        assert row["has_image"] == (row["image"] is not None) == with_image
        assert row["has_text"] == (row["text"] is not None)
        if with_image:
            assert isinstance(row["image"], Image.Image) and row["image"].size == (8, 8)
        if adapter.task == "classification":
            assert row["options"] and row["answer"] == OPTION_LETTERS[row["label"]]
        else:
            assert row["options"] == []
    flags = [row["has_text"] for row in train]
    assert flags == (with_text if isinstance(with_text, list) else [with_text] * n_train)
    if adapter.task == "vqa":  # train labels index the train answer vocabulary
        assert sorted({row["label"] for row in train}) == list(range(num_classes))


@pytest.mark.parametrize("source", list(CASES), indirect=True)
def test_subsample_is_capped_seeded_and_in_source_order(source, caplog):
    name, root = source
    adapter = REAL_DATASETS[name]
    full = adapter.load(_cfg(name, root), seed=0)
    with caplog.at_level(logging.INFO, logger="fedsim.data"):
        small = adapter.load(_cfg(name, root, num_train=2, num_test=1), seed=3)
    assert (len(small.train), len(small.test)) == (2, 1)
    assert any("subsample" in r.getMessage() and r.name == "fedsim.data" for r in caplog.records)
    again = adapter.load(_cfg(name, root, num_train=2, num_test=1), seed=3)
    assert small.train["question"] == again.train["question"] and small.test["question"] == again.test["question"]
    # kept rows appear in the order of the full split
    key = [f"{q}|{t}" for q, t in zip(full.train["question"], full.train["text"])]
    picked = [key.index(f"{q}|{t}") for q, t in zip(small.train["question"], small.train["text"])]
    assert picked == sorted(picked)
    # a cap above the size keeps everything
    assert len(adapter.load(_cfg(name, root, num_train=1000), seed=0).train) == len(full.train)


@pytest.mark.parametrize("name", list(CASES))
def test_missing_path_names_the_path_and_the_layout(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError) as err:
        REAL_DATASETS[name].check_source(_cfg(name, missing))
    message = str(err.value)
    assert str(missing) in message and "does not exist" in message and "data.path" in message
    assert REAL_DATASETS[name].layout in message


MISSING = {  # name -> (entry to delete, text the message must contain)
    "hateful_memes": ("dev_seen.jsonl", "'dev_seen.jsonl' (or 'dev.jsonl')"),
    "crisismmd": ("crisismmd_datasplit_agreed_label/task_humanitarian_text_img_agreed_lab_test.tsv",
                  "task_humanitarian_text_img_agreed_lab_test.tsv"),
    "hateful_memes_test_seen": ("test_seen.jsonl", "lacks 'test_seen.jsonl'"),
    "crisismmd_all": ("crisismmd_datasplit_all/task_humanitarian_text_img_train.tsv",
                      "crisismmd_datasplit_all/task_humanitarian_text_img_train.tsv"),
    "vqa_rad": ("VQA_RAD Image Folder", "VQA_RAD Image Folder/"),
    "slake": ("test.json", "test.json"),
    "medalpaca": ("medical_meadow_wikidoc_medical_flashcards.json", "medical_meadow_wikidoc_medical_flashcards"),
    "scienceqa": ("problems.json", "problems.json"),
}


@pytest.mark.parametrize("source", list(CASES), indirect=True)
def test_missing_file_is_named(source):
    name, root = source
    entry, expected = MISSING[name]
    target = root / entry
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ValueError) as err:
        REAL_DATASETS[name].check_source(_cfg(name, root))
    assert str(root) in str(err.value) and expected in str(err.value)
    assert REAL_DATASETS[name].layout in str(err.value)
    with pytest.raises(ValueError):
        REAL_DATASETS[name].load(_cfg(name, root), seed=0)


@pytest.mark.parametrize("name", list(CASES))
def test_exactly_one_of_path_and_hub(name, tmp_path):
    adapter = REAL_DATASETS[name]
    with pytest.raises(ValueError, match=r"data\.path.*data\.hub.*neither"):
        adapter.check_source(_cfg(name))
    with pytest.raises(ValueError, match=r"data\.path.*data\.hub.*both"):
        adapter.check_source(_cfg(name, tmp_path, hub="someone/something"))
    adapter.check_source(_cfg(name, hub="someone/something"))  # no network: the hub is only read by load


def test_empty_path_counts_as_unset_and_home_is_expanded(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="neither"):
        REAL_DATASETS["slake"].check_source(_cfg("slake", ""))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "slake").mkdir()
    make_slake(tmp_path / "slake")
    REAL_DATASETS["slake"].check_source(_cfg("slake", "~/slake"))


@pytest.mark.parametrize("source", ["vqa_rad"], indirect=True)
def test_a_file_without_the_expected_fields_is_named(source):
    name, root = source
    path = root / "VQA_RAD Dataset Public.json"
    items = json.loads(path.read_text())
    write_json(path, [{k: v for k, v in item.items() if k != "phrase_type"} for item in items])
    with pytest.raises(ValueError, match=r"VQA_RAD Dataset Public\.json.*lacks fields \['phrase_type'\]"):
        REAL_DATASETS[name].load(_cfg(name, root), seed=0)


def test_check_data_source_dispatches_to_the_adapter(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_data_source(_cfg("vqa_rad", tmp_path / "absent"))
    cfg = SimpleNamespace(dataset="slake", path=str(tmp_path), hub=None, num_train=0, num_test=0)
    with pytest.raises(ValueError, match="lacks 'train.json'"):
        REAL_DATASETS["slake"].check_source(cfg)


# -- per-dataset mapping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["hateful_memes"], indirect=True)
def test_hateful_memes_rows(source):
    name, root = source
    splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    row = splits.train[1]
    assert row["text"] == "meme text 1" and row["question"] == "Is this meme hateful?"
    assert row["options"] == ["not hateful", "hateful"] and (row["answer"], row["label"]) == ("B", 1)
    assert splits.train[0]["answer"] == "A"
    assert splits.test["text"] == ["meme text 10", "meme text 11", "meme text 12"]  # dev_seen, not test_seen
    assert _colour(splits.train[2]["image"]) == 2


@pytest.mark.parametrize("source", ["hateful_memes"], indirect=True)
def test_hateful_memes_falls_back_to_dev_jsonl_and_drops_missing_images(source, caplog):
    name, root = source
    (root / "dev_seen.jsonl").rename(root / "dev.jsonl")
    (root / "img" / "00004.png").unlink()
    with caplog.at_level(logging.WARNING, logger="fedsim.data"):
        splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    assert (len(splits.train), len(splits.test)) == (5, 3)
    assert "meme text 4" not in splits.train["text"]
    assert any("missing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("source", ["crisismmd"], indirect=True)
def test_crisismmd_rows(source):
    name, root = source
    splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    assert splits.train["options"][0] == CRISIS_OPTIONS == [
        "affected individuals", "infrastructure and utility damage", "not humanitarian",
        "other relevant information", "rescue, volunteering or donation effort"]
    assert splits.train["text"] == [text for _, text in CRISIS_TRAIN]  # the quote did not merge lines
    assert splits.train["answer"] == ["E", "C", "B", "B", "D", "A"]  # vehicle damage -> infrastructure
    assert splits.test["label"] == [2, 0]
    assert _colour(splits.train[0]["image"]) == 0


@pytest.mark.parametrize("source", ["hateful_memes_test_seen"], indirect=True)
def test_hateful_memes_test_seen_scores_the_labelled_test_seen(source):
    name, root = source
    splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    assert splits.test["text"] == ["seen 20", "seen 21", "seen 22", "seen 23"]  # test_seen, not dev_seen
    assert splits.test["answer"] == ["A", "A", "B", "B"] and splits.metric == "roc_auc"
    assert splits.train["text"] == REAL_DATASETS["hateful_memes"].load(_cfg(name, root), seed=0).train["text"]
    assert "test_seen.jsonl" in REAL_DATASETS[name].layout and "dev_seen" not in REAL_DATASETS[name].required[2]
    # the first release's test_seen.jsonl has no labels: named, with the layout
    (root / "test_seen.jsonl").write_text(json.dumps({"id": 1, "img": "img/00020.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"test_seen\.jsonl.*lacks fields \['label'\]"):
        REAL_DATASETS[name].load(_cfg(name, root), seed=0)


@pytest.mark.parametrize("source", ["crisismmd_all"], indirect=True)
def test_crisismmd_all_keeps_eight_classes_of_the_image_label(source):
    name, root = source
    splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    assert splits.train["options"][0] == [
        "affected individuals", "infrastructure and utility damage", "injured or dead people",
        "missing or found people", "rescue, volunteering or donation effort", "vehicle damage",
        "other relevant information", "not humanitarian"]  # the FedMLLM code's order
    # label_image decides (rows 4, 6 and 8 disagree with label_text); no class is merged
    assert splits.train["answer"] == ["C", "F", "D", "H", "G", "A", "B", "E"]
    assert splits.test["label"] == [5, 3] and splits.num_classes == 8 and splits.metric == "macro_f1"
    assert splits.train["text"][0] == "Two hurt" and splits.train["text"][3] == "Donate  now"  # URLs removed
    assert len(CRISIS_ALL_TRAIN) == len(splits.train)
    assert "crisismmd_datasplit_all" in REAL_DATASETS[name].layout
    assert "agreed" not in REAL_DATASETS[name].layout
    assert "crisismmd_datasplit_all" not in REAL_DATASETS["crisismmd"].layout  # each adapter its own layout


def test_crisismmd_all_hub_mapping_keeps_fine_classes():
    names = sorted(["affected_individuals", "infrastructure_and_utility_damage", "injured_or_dead_people",
                    "missing_or_found_people", "not_humanitarian", "other_relevant_information",
                    "rescue_volunteering_or_donation_effort", "vehicle_damage"])
    ds = _with_images({"tweet_text": ["hurt http://t.co/x", "car"], "label": [2, 7]}, [_pil(0), _pil(1)])
    ds = ds.cast_column("label", datasets.ClassLabel(names=names))
    rows = REAL_DATASETS["crisismmd_all"].map_hub(ds)
    assert [(r["text"], r["answer"]) for r in rows] == [("hurt", "C"), ("car", "F")]


def test_crisismmd_class_merge_and_unknown_class():
    assert class_index("injured_or_dead_people") == class_index("missing_or_found_people") == 0
    assert class_index("vehicle_damage") == 1
    with pytest.raises(ValueError, match="unknown humanitarian class 'weather'"):
        class_index("weather")


@pytest.mark.parametrize("source", ["vqa_rad"], indirect=True)
def test_vqa_rad_rows(source):
    name, root = source
    splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    assert splits.test["question"] == ["Which organ is this?", "Is there a mass?"]  # phrase_type test_*
    row = splits.train[2]
    assert (row["question"], row["answer"], row["text"]) == ("How many lesions are seen?", "2", None)
    # labels index the sorted, lowercased train answers: ["2", "lung", "yes"]; unseen test answers get -1
    assert splits.train["label"] == [2, 2, 0, 1]
    assert splits.test["label"] == [1, -1]
    assert _colour(splits.train[0]["image"]) == 0


@pytest.mark.parametrize("source", ["slake"], indirect=True)
def test_slake_rows_keep_english_only(source):
    name, root = source
    splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    assert splits.train["question"] == ["What modality is used to take this image?", "Which organ is abnormal?",
                                        "Does the picture contain liver?", "Where is the abnormality?"]
    assert splits.train["answer"] == ["CT", "Lung", "No", "Left Lung"]
    assert splits.test["answer"] == ["Liver"] and splits.test["label"] == [-1]
    assert _colour(splits.train[1]["image"]) == 1


@pytest.mark.parametrize("source", ["medalpaca"], indirect=True)
def test_medalpaca_rows_and_seeded_holdout(source):
    name, root = source
    adapter = REAL_DATASETS[name]
    a, b = adapter.load(_cfg(name, root), seed=0), adapter.load(_cfg(name, root), seed=0)
    assert a.test["text"] == b.test["text"]
    row = a.train[0]
    assert row["question"] == "Answer this question truthfully"
    assert row["text"].startswith("What does marker ") and row["answer"] == f"Condition {row['text'].split()[3]}."
    assert "orphan answer" not in list(a.train["answer"]) + list(a.test["answer"])
    assert not set(a.train["text"]) & set(a.test["text"])
    assert len(set(a.train["text"]) | set(a.test["text"])) == 20
    tests = {tuple(adapter.load(_cfg(name, root), seed=s).test["text"]) for s in range(5)}
    assert len(tests) > 1  # the holdout depends on the seed


@pytest.mark.parametrize("source", ["scienceqa"], indirect=True)
def test_scienceqa_rows(source):
    name, root = source
    splits = REAL_DATASETS[name].load(_cfg(name, root), seed=0)
    assert splits.train["question"] == [SCIENCEQA_PROBLEMS[p]["question"] for p in ("1", "2", "4")]
    assert [len(o) for o in splits.train["options"]] == [3, 2, 5]
    assert splits.train["answer"] == ["B", "B", "E"]
    assert splits.train["text"] == ["Look at the picture.", None, None]
    row = splits.test[0]
    assert (row["options"], row["answer"], row["label"]) == (["Austin", "Dallas", "Houston"], "A", 0)
    assert _colour(splits.test[1]["image"]) == 6


# -- hub column mappings on local datasets with the hub's columns -------------------------------------------


def _with_images(columns: dict, images: list) -> datasets.Dataset:
    ds = datasets.Dataset.from_dict({**columns, "image": images})
    return ds.cast_column("image", datasets.Image())


def _to_splits(rows: list[dict]) -> datasets.Dataset:
    return real_base.to_dataset(rows)


def test_hateful_memes_hub_mapping():
    ds = _with_images({"id": ["1", "2", "3"], "text": ["a", "b", "c"], "label": [0, 1, 1]}, [_pil(0), None, _pil(2)])
    rows = REAL_DATASETS["hateful_memes"].map_hub(ds)
    assert [(r["text"], r["answer"], r["label"]) for r in rows] == [("a", "A", 0), ("c", "B", 1)]
    out = _to_splits(rows)
    assert out.features == features() and _colour(out[1]["image"]) == 2
    with pytest.raises(ValueError, match="lacks columns"):
        REAL_DATASETS["hateful_memes"].map_hub(datasets.Dataset.from_dict({"img": ["img/1.png"], "text": ["a"],
                                                                           "label": [0]}))


def test_crisismmd_hub_mapping_merges_fine_classes():
    names = ["affected_individuals", "infrastructure_and_utility_damage", "injured_or_dead_people",
             "missing_or_found_people", "not_humanitarian", "other_relevant_information",
             "rescue_volunteering_or_donation_effort", "vehicle_damage"]
    ds = _with_images({"event_name": ["e"] * 3, "tweet_id": ["1", "2", "3"], "image_id": ["1_0", "2_0", "3_0"],
                       "tweet_text": ["hurt", "car", "help"], "image_path": ["p1", "p2", "p3"],
                       "label": [2, 7, 6]}, [_pil(0), _pil(1), _pil(2)])
    ds = ds.cast_column("label", datasets.ClassLabel(names=names))
    rows = REAL_DATASETS["crisismmd"].map_hub(ds)
    assert [(r["text"], r["answer"]) for r in rows] == [("hurt", "A"), ("car", "B"), ("help", "E")]
    assert all(r["options"] == CRISIS_OPTIONS for r in rows)


def test_vqa_rad_hub_mapping_and_load_through_the_hub_path(monkeypatch):
    hub = {"train": _with_images({"question": ["is it normal?", "which organ?"], "answer": ["no", "liver"]},
                                 [_pil(0), _pil(1)]),
           "test": _with_images({"question": ["is it a ct?"], "answer": ["yes"]}, [_pil(2)])}
    requested = []

    def fake_split(name, config, candidates, revision=None):
        requested.append((name, config, candidates, revision))
        return hub[candidates[0]]

    monkeypatch.setattr(real_base, "load_hub_split", fake_split)
    splits = REAL_DATASETS["vqa_rad"].load(_cfg("vqa_rad", hub="flaviagiammarino/vqa-rad"), seed=0)
    assert requested == [("flaviagiammarino/vqa-rad", None, ("train",), None),
                         ("flaviagiammarino/vqa-rad", None, ("test",), None)]
    assert splits.train.features == features() and splits.train["answer"] == ["no", "liver"]
    assert splits.num_classes == 2 and splits.test["label"] == [-1]
    assert _colour(splits.test[0]["image"]) == 2


def test_slake_hub_mapping_with_image_folder_or_image_column(tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "xmlab0" / "source.jpg", 4)
    ds = datasets.Dataset.from_dict({
        "img_id": [0, 0], "img_name": ["xmlab0/source.jpg"] * 2, "question": ["Which organ?", "哪个器官？"],
        "answer": ["Liver", "肝脏"], "q_lang": ["en", "zh"], "qid": [1, 2]})
    rows = Slake().map_hub(ds, image_root=images)
    assert [(r["question"], r["answer"]) for r in rows] == [("Which organ?", "Liver")]
    assert _colour(_to_splits(rows)[0]["image"]) == 4
    with pytest.raises(ValueError, match="image_root"):
        Slake().map_hub(ds)
    with_column = _with_images({"question": ["Is it MRI?"], "answer": ["No"]}, [_pil(5)])
    assert Slake().map_hub(with_column)[0]["answer"] == "No"


def test_medalpaca_hub_mapping_and_holdout(monkeypatch):
    ds = datasets.Dataset.from_dict({"instruction": ["Answer this question truthfully"] * 11,
                                     "input": [f"q{i}" for i in range(10)] + [""],
                                     "output": [f"a{i}" for i in range(11)]})
    rows = REAL_DATASETS["medalpaca"].map_hub(ds)
    assert len(rows) == 10 and rows[0]["text"] == "q0" and rows[0]["answer"] == "a0" and rows[0]["image"] is None
    revisions = []
    monkeypatch.setattr("fedsim.data.real.medalpaca.load_hub_split",
                        lambda name, config, candidates, revision=None: revisions.append(revision) or ds)
    cfg = _cfg("medalpaca", hub="medalpaca/medical_meadow_medical_flashcards")
    cfg.revision = "v1.0"
    splits = REAL_DATASETS["medalpaca"].load(cfg, seed=1)
    assert revisions == ["v1.0"]
    assert (len(splits.train), len(splits.test)) == (9, 1)
    assert not any(splits.train["has_image"]) and all(splits.train["has_text"])


def test_scienceqa_hub_mapping_keeps_image_problems():
    ds = _with_images({"question": ["Which is hot?", "Spell it", "Which is cold?"],
                       "choices": [["sun", "ice"], ["a", "b", "c"], ["sun", "ice", "fire", "lava"]],
                       "answer": [0, 2, 1], "hint": ["", "", "Think."], "task": ["closed choice"] * 3,
                       "grade": ["grade1"] * 3, "subject": ["natural science"] * 3},
                      [_pil(0), None, _pil(1)])
    rows = REAL_DATASETS["scienceqa"].map_hub(ds)
    assert [(r["question"], r["answer"], r["text"], len(r["options"])) for r in rows] == [
        ("Which is hot?", "A", None, 2), ("Which is cold?", "B", "Think.", 4)]


# -- hub revisions ----------------------------------------------------------------------------------------


def test_data_revision_reaches_every_hub_call(monkeypatch):
    calls = []

    def split_names(hub, config=None, **kwargs):
        calls.append(("split_names", hub, kwargs.get("revision")))
        return ["train", "test"]

    def load_dataset(hub, config=None, **kwargs):
        calls.append(("load_dataset", hub, kwargs.get("revision")))
        image = _pil(2 if kwargs["split"] == "test" else 1)
        return _with_images({"question": ["is it a ct?"], "answer": ["yes"]}, [image])

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = _cfg("vqa_rad", hub="flaviagiammarino/vqa-rad")
    cfg.revision = "0123abcd"
    REAL_DATASETS["vqa_rad"].load(cfg, seed=0)
    assert calls == [(kind, "flaviagiammarino/vqa-rad", "0123abcd") for kind in ("split_names", "load_dataset")] * 2


def test_data_revision_with_a_local_folder_is_ignored_with_a_warning(tmp_path, caplog):
    root = tmp_path / "vqa_rad"
    root.mkdir()
    make_vqa_rad(root)
    cfg = _cfg("vqa_rad", path=root)
    cfg.revision = "v2"
    with caplog.at_level(logging.WARNING, logger="fedsim.data"):
        splits = REAL_DATASETS["vqa_rad"].load(cfg, seed=0)
    assert len(splits.train) == CASES["vqa_rad"][1]
    assert "data.revision='v2' is ignored" in caplog.text and str(root) in caplog.text


def test_slake_hub_images_come_from_the_pinned_revision_unpacked_once(tmp_path, monkeypatch):
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        buffer = io.BytesIO()
        _pil(4).save(buffer, format="JPEG")
        zf.writestr("imgs/xmlab0/source.jpg", buffer.getvalue())
    downloads = []

    def download(repo, filename, repo_type=None, revision=None):
        downloads.append((repo, filename, repo_type, revision))
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    split = datasets.Dataset.from_dict({"img_name": ["xmlab0/source.jpg"], "question": ["Which organ?"],
                                        "answer": ["Liver"], "q_lang": ["en"]})
    monkeypatch.setattr("fedsim.data.real.slake.load_hub_split", lambda hub, config, candidates, revision: split)
    for _ in range(2):
        rows = Slake().hub_rows("BoKelvin/SLAKE", seed=0, revision="refs/pr/1")
    assert downloads == [("BoKelvin/SLAKE", "imgs.zip", "dataset", "refs/pr/1")] * 2
    unpacked = tmp_path / "cache" / "fedsim" / "BoKelvin__SLAKE" / "imgs@refs__pr__1"
    assert rows["train"][0]["image"] == str((unpacked / "imgs" / "xmlab0" / "source.jpg").resolve())
    assert (unpacked / real_base.UNPACKED_MARK).exists()


# -- archives ---------------------------------------------------------------------------------------------


def _zip(path: Path, members: dict, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip of ``members``: name -> bytes, or a ZipInfo -> bytes for crafted headers."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _symlink(name: str, points_to: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the high 16 bits of external_attr are the file mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, points_to.encode()


def test_unpack_archive_writes_every_member_and_marks_the_folder(tmp_path):
    archive = _zip(tmp_path / "ok.zip", {"imgs/a/source.jpg": b"jpg", "imgs/b/": b"", "train.json": b"[]"})
    target = tmp_path / "out" / "imgs"
    real_base.unpack_archive(archive, target)
    assert (target / "imgs" / "a" / "source.jpg").read_bytes() == b"jpg" and (target / "imgs" / "b").is_dir()
    assert (target / "train.json").read_bytes() == b"[]" and (target / real_base.UNPACKED_MARK).exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["imgs"]  # no staging folder left behind


@pytest.mark.parametrize("member", ["../evil.txt", "imgs/../../evil.txt", "/tmp/evil.txt", "..\\evil.txt",
                                    "C:/evil.txt", "link"])
def test_unpack_archive_refuses_a_member_that_leaves_the_folder_before_writing(tmp_path, member):
    first = {"imgs/fine.jpg": b"fine"}  # a harmless member first: nothing may be written even so
    if member == "link":
        info, data = _symlink("imgs/link", "/etc/passwd")
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("imgs/fine.jpg", b"fine")
            zf.writestr(info, data)
        member = "imgs/link"
    else:
        archive = _zip(tmp_path / "bad.zip", {**first, member: b"evil"})
    target = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="refusing to unpack") as err:
        real_base.unpack_archive(archive, target)
    assert repr(member) in str(err.value) and "nothing was written" in str(err.value)
    assert not (tmp_path / "deep").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()


def test_unpack_archive_bounds_total_size_and_member_count(tmp_path):
    archive = _zip(tmp_path / "big.zip", {f"imgs/{i}.jpg": bytes(600) for i in range(3)}, zipfile.ZIP_STORED)
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"more than 1000 bytes uncompressed .*'imgs/1.jpg'.*data.path"):
        real_base.unpack_archive(archive, target, max_bytes=1000)
    with pytest.raises(ValueError, match="3 members, more than the 2 allowed"):
        real_base.unpack_archive(archive, target, max_members=2)
    assert not target.exists()
    real_base.unpack_archive(archive, target, max_bytes=1800, max_members=3)  # exactly at both limits
    assert len(list((target / "imgs").iterdir())) == 3


def test_unpack_archive_refuses_a_zip_bomb_ratio(tmp_path):
    size = real_base.RATIO_FLOOR + 1
    archive = _zip(tmp_path / "bomb.zip", {"imgs/zeros.bin": bytes(size)})
    info = zipfile.ZipFile(archive).getinfo("imgs/zeros.bin")
    assert info.file_size > real_base.MAX_RATIO * info.compress_size  # what a bomb looks like: 1 MiB of zeros
    with pytest.raises(ValueError, match=r"'imgs/zeros.bin' declares \d+ bytes from \d+ compressed"):
        real_base.unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slake_from_the_hub_refuses_a_malicious_image_archive(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "imgs.zip", {"imgs/xmlab0/source.jpg": b"x", "../../escape.py": b"import os"})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: str(archive))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    split = datasets.Dataset.from_dict({"img_name": ["xmlab0/source.jpg"], "question": ["Which organ?"],
                                        "answer": ["Liver"], "q_lang": ["en"]})
    monkeypatch.setattr("fedsim.data.real.slake.load_hub_split", lambda hub, config, candidates, revision: split)
    with pytest.raises(ValueError, match="'../../escape.py' would be written outside"):
        REAL_DATASETS["slake"].load(_cfg("slake", hub="BoKelvin/SLAKE"), seed=0)
    assert not list(tmp_path.rglob("escape.py"))


def _unpack_and_read(archive: Path, target: Path, start, results) -> None:
    """One worker of a node: unpack the shared archive (once), then read every file of the folder."""
    start.wait()
    try:
        real_base.unpack_once(archive, target)
        files = sorted((p.relative_to(target).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                       for p in target.rglob("*") if p.is_file())
        results.put((target.stat().st_ino, files))
    except Exception as err:  # reported to the test, which fails on it
        results.put((None, repr(err)))


def test_processes_unpacking_one_archive_at_once_all_read_one_finished_folder(tmp_path):
    """Workers on one node share the cache folder: started together, one unpacks under the lock and the others
    wait, then read its folder (the same inode, every file), with no staging folder left behind."""
    members = {f"imgs/{i:03d}/source.jpg": bytes([i % 256]) * 4096 for i in range(300)}
    archive = _zip(tmp_path / "imgs.zip", members)
    target = tmp_path / "cache" / "imgs"
    context = multiprocessing.get_context("fork")  # the children need no imports of their own
    start, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_unpack_and_read, args=(archive, target, start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    seen = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    expected = sorted([(name, hashlib.sha256(data).hexdigest()) for name, data in members.items()]
                      + [(real_base.UNPACKED_MARK, hashlib.sha256(b"").hexdigest())])
    assert [files for _, files in seen] == [expected] * 4
    assert {inode for inode, _ in seen} == {target.stat().st_ino}  # one unpack, not one per process
    assert staged_dirs(target) == []
