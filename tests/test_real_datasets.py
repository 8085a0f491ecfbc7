"""Real dataset adapters on tiny fixtures in each source's own format (no network)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

from fedsim.config import DataConfig
from fedsim.data import check_data_source
from fedsim.data.real import REAL_DATASETS, RealDataset
from fedsim.data.real import base as real_base
from fedsim.data.real.crisismmd import OPTIONS as CRISIS_OPTIONS, class_index
from fedsim.data.real.slake import Slake
from fedsim.data.schema import FEATURES, OPTION_LETTERS
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

    assert splits.train.features == FEATURES and splits.test.features == FEATURES
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
    assert out.features == FEATURES and _colour(out[1]["image"]) == 2
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

    def fake_split(name, config, candidates):
        requested.append((name, config, candidates))
        return hub[candidates[0]]

    monkeypatch.setattr(real_base, "load_hub_split", fake_split)
    splits = REAL_DATASETS["vqa_rad"].load(_cfg("vqa_rad", hub="flaviagiammarino/vqa-rad"), seed=0)
    assert requested == [("flaviagiammarino/vqa-rad", None, ("train",)), ("flaviagiammarino/vqa-rad", None, ("test",))]
    assert splits.train.features == FEATURES and splits.train["answer"] == ["no", "liver"]
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
    monkeypatch.setattr("fedsim.data.real.medalpaca.load_hub_split", lambda name, config, candidates: ds)
    splits = REAL_DATASETS["medalpaca"].load(_cfg("medalpaca", hub="medalpaca/medical_meadow_medical_flashcards"),
                                             seed=1)
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
