import copy

import datasets
import pytest
import torch

from fedsim.config import EvalConfig, ModelConfig
from fedsim.data.collator import IGNORE_INDEX, Collator
from fedsim.data.schema import OPTION_LETTERS
from fedsim.data.synthetic import generate
from fedsim.evaluation import Evaluator
from fedsim.models.adapter import inference
from fedsim.models.loading import load_model
from fedsim.models.tiny import CHAT_TEMPLATE

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
