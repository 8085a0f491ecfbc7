import copy

import datasets
import numpy as np
import pytest
import torch

from fedsim.config import ConfigError, EvalConfig, ModelConfig
from fedsim.data.collator import IGNORE_INDEX, Collator
from fedsim.data.schema import OPTION_LETTERS
from fedsim.data.synthetic import generate
from fedsim.evaluation import Evaluator
from fedsim.models.adapter import inference
from fedsim.models.loading import load_model
from fedsim.models.tiny import CHAT_TEMPLATE

from conftest import small_config

# The tiny preset's template with every assistant turn opening with "Option ": the answer "A" renders as
# "Option A<|im_end|>\n", so all option letters share their first answer token.
PREFIXED_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% elif item['type'] == 'text' %}",
    "{% elif item['type'] == 'text' %}{% if message['role'] == 'assistant' %}Option {% endif %}")
END_OF_TURN = 2  # "<|im_end|>", "\n": the same for every option, so not part of what scores an option


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load_model(ModelConfig(name=str(tiny_path)), seed=0)


def reference_loglik(model, processor, sample: dict, option: int) -> float:
    """The option's answer log-likelihood from the model's own loss on prompt + answer, one sequence alone."""
    batch = Collator(processor, 256, train=True)([{**sample, "answer": OPTION_LETTERS[option]}])
    batch["labels"][0, -END_OF_TURN:] = IGNORE_INDEX
    with inference(model):
        loss = model(**batch).loss  # mean negative log-likelihood over the labelled tokens
    return -float(loss) * int((batch["labels"] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("template", [None, PREFIXED_TEMPLATE], ids=["single-token", "shared-first-token"])
def test_option_loglikelihoods_match_the_models_loss(loaded, template):
    processor = loaded.processor
    if template:
        processor = copy.copy(processor)
        processor.chat_template = template
    test = generate("classification", 2, "test", seed=0)
    first, second = test
    # A text-only row next to an image row: prompts of different lengths, so right padding is exercised; with
    # batch_size 3 the 8 (sample, option) sequences of the shared-first-token case mix both rows too.
    samples = [first, {**second, "image": None, "has_image": False}]
    evaluator = Evaluator(processor, test, EvalConfig(batch_size=3), 256, loaded.device, seed=0)
    with inference(loaded.model):
        scores = evaluator.option_loglikelihoods(loaded.model, samples)
    expected = [[reference_loglik(loaded.model, processor, s, i) for i in range(len(s["options"]))] for s in samples]
    assert torch.allclose(torch.stack(scores), torch.tensor(expected), atol=1e-4)
    assert 0.0 <= evaluator.evaluate(loaded.model)["accuracy"] <= 1.0


def test_max_samples_is_a_seeded_sample_in_split_order(loaded):
    test = generate("classification", 40, "test", seed=0).add_column("row", list(range(40)))

    def rows(seed: int) -> list[int]:
        evaluator = Evaluator(loaded.processor, test, EvalConfig(max_samples=8), 256, torch.device("cpu"), seed=seed)
        (group,) = evaluator.groups.values()
        return list(group["row"])

    first = rows(0)
    assert len(first) == len(set(first)) == 8 and first == sorted(first)
    assert first != list(range(8))
    assert rows(0) == first and rows(1) != first
    whole = Evaluator(loaded.processor, test, EvalConfig(max_samples=50), 256, torch.device("cpu"), seed=0)
    assert list(next(iter(whole.groups.values()))["row"]) == list(range(40))


def test_a_source_mixing_multiple_choice_and_open_rows_is_an_error(loaded):
    mixed = datasets.concatenate_datasets([generate("classification", 1, "test", seed=0),
                                           generate("vqa", 2, "test", seed=0)])
    mixed = mixed.remove_columns("source").add_column("source", ["clinic"] * 3)
    with pytest.raises(ValueError, match="'clinic'.*1 of 3 rows"):
        Evaluator(loaded.processor, mixed, EvalConfig(), 256, torch.device("cpu"), seed=0)


def removed(test: datasets.Dataset, modality: str) -> datasets.Dataset:
    """``test`` with every row's image or text removed, row by row."""
    return datasets.Dataset.from_list([{**row, modality: None, f"has_{modality}": False} for row in test],
                                      features=test.features)


def test_ablations_score_the_split_without_a_modality(loaded):
    rows = generate("classification", 4, "test", seed=0)
    # A row already without its image: no_image leaves it as it is, no_text leaves it with neither modality.
    test = datasets.concatenate_datasets([removed(rows.select([0]), "image"), rows.select(range(1, 4))])
    evaluator = Evaluator(loaded.processor, test, EvalConfig(batch_size=4, ablations=["no_image", "no_text"]), 256,
                          loaded.device, seed=0)
    out = evaluator.evaluate(loaded.model)

    def score(split: datasets.Dataset) -> dict[str, float]:
        return Evaluator(loaded.processor, split, EvalConfig(batch_size=4), 256, loaded.device, seed=0) \
            .evaluate(loaded.model)

    full = score(test)
    expected = {**full, **{f"no_image/{k}": v for k, v in score(removed(test, "image")).items()},
                **{f"no_text/{k}": v for k, v in score(removed(test, "text")).items()}}
    assert "no_image/accuracy" in out and "no_text/macro_f1" in out
    np.testing.assert_equal(out, expected)  # NaN (roc_auc of a one-class split) equals NaN here
    (no_image,), (no_text,) = (evaluator.ablated[a].values() for a in ("no_image", "no_text"))  # built up front
    assert not any(no_image["has_image"]) and set(no_image["image"]) == {None} and all(no_image["has_text"])
    assert not any(no_text["has_text"]) and set(no_text["text"]) == {None}
    assert list(no_text["has_image"]) == list(test["has_image"])  # the row without an image stays without


def test_ablations_of_a_split_with_several_sources(loaded):
    rows = generate("classification", 4, "test", seed=0)
    notes = removed(rows.select([2, 3]), "image").remove_columns("source").add_column("source", ["notes"] * 2)
    test = datasets.concatenate_datasets([rows.select([0, 1]), notes.cast(rows.features)])
    cfg = EvalConfig(batch_size=4, ablations=["no_image"])
    out = Evaluator(loaded.processor, test, cfg, 256, loaded.device, seed=0).evaluate(loaded.model)
    sources = ("synthetic/classification", "notes")
    full = {k for k in out if not k.startswith("no_image/")}
    assert {k for k in out if k.startswith("no_image/")} == {f"no_image/{k}" for k in full}
    assert {k.split("/accuracy")[0] for k in full if k.endswith("/accuracy")} == set(sources)
    assert out["no_image/accuracy"] == pytest.approx(np.mean([out[f"no_image/{s}/accuracy"] for s in sources]))
    # The text-only source has no image to lose.
    assert all(out[f"no_image/notes/{metric}"] == out[f"notes/{metric}"] for metric in ("accuracy", "macro_f1"))


@pytest.mark.parametrize("ablations", [["no_audio"], ["no_image", "no_image"]])
def test_an_unknown_or_repeated_ablation_is_a_config_error(tmp_path, ablations):
    with pytest.raises(ConfigError, match="'eval.ablations'"):
        small_config(tmp_path, f"eval.ablations=[{','.join(ablations)}]")
    assert small_config(tmp_path, "eval.ablations=[no_text,no_image]").eval.ablations == ["no_text", "no_image"]
