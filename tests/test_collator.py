import pytest
import torch
from transformers import AutoProcessor

from fedsim.data.collator import IGNORE_INDEX, Collator, prompt_and_answer, user_text
from fedsim.data.synthetic import generate
from fedsim.models.tiny import tiny_model_path

END_OF_TURN = "<|im_end|>\n"  # the tiny preset's ChatML template closes every turn with this
IMAGE_TOKENS = 16  # (32 / patch 8) ** 2 patches; CLIP's CLS token is dropped


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(tiny_model_path())


@pytest.fixture(scope="module")
def samples():
    return list(generate("classification", 4, "train", seed=0))


@pytest.fixture(scope="module")
def vqa_sample():
    return generate("vqa", 1, "train", seed=0)[0]


def _text_only(sample: dict) -> dict:
    return dict(sample, image=None, has_image=False)


def _image_only(sample: dict) -> dict:
    return dict(sample, text=None, has_text=False)


def _image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<image>")


def _decode(processor, ids: torch.Tensor) -> str:
    return processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def _expanded(prompt: str) -> str:
    """The prompt as the processor tokenizes it: one <image> placeholder per image patch."""
    return prompt.replace("<image>", "<image>" * IMAGE_TOKENS)


def test_prompt_and_answer_splits_at_the_answer(processor, samples):
    sample = samples[0]
    prompt, answer = prompt_and_answer(processor, sample)
    assert answer.startswith(sample["answer"])
    assert answer == sample["answer"] + END_OF_TURN
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<image>" in prompt


def test_labels_are_masked_except_the_answer(processor, samples):
    batch = Collator(processor, max_length=128, train=True)(samples)
    assert batch["labels"].shape == batch["input_ids"].shape
    for row in range(len(samples)):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        kept = labels != IGNORE_INDEX
        # Unmasked labels are the trailing real tokens, equal to the inputs there, and decode to the answer.
        assert torch.equal(labels[kept], ids[kept])
        positions = kept.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))
        assert positions[-1] == mask.sum() - 1
        assert _decode(processor, labels[kept]) == samples[row]["answer"] + END_OF_TURN
        # The inputs are the whole conversation: prompt, then answer.
        prompt, answer = prompt_and_answer(processor, samples[row])
        assert _decode(processor, ids[: int(mask.sum())]) == _expanded(prompt) + answer


def test_right_padding_for_training(processor, samples):
    short = dict(samples[0], text="ok")
    long = dict(samples[1], text="the parcel looks sturdy and heavy " * 3)
    batch = Collator(processor, max_length=256, train=True)([short, long])
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    pad = processor.tokenizer.pad_token_id
    n = int(lengths[0])
    assert torch.all(batch["attention_mask"][0, :n] == 1)
    assert torch.all(batch["attention_mask"][0, n:] == 0)
    assert torch.all(batch["input_ids"][0, n:] == pad)
    assert torch.all(batch["labels"][0, n:] == IGNORE_INDEX)
    # The real tokens sit at the start, ending with the answer.
    assert _decode(processor, batch["input_ids"][0, :n]).endswith(short["answer"] + END_OF_TURN)


def test_left_padding_for_generation(processor, samples):
    short = dict(samples[0], text="ok")
    long = dict(samples[1], text="the parcel looks sturdy and heavy " * 3)
    batch = Collator(processor, max_length=256, train=False, padding_side="left")([short, long])
    assert "labels" not in batch
    width = batch["input_ids"].shape[1]
    n = int(batch["attention_mask"][0].sum())
    assert n < width
    assert torch.all(batch["attention_mask"][0, : width - n] == 0)
    assert torch.all(batch["attention_mask"][0, width - n:] == 1)
    assert torch.all(batch["input_ids"][0, : width - n] == processor.tokenizer.pad_token_id)
    # Both rows end with the generation prompt and carry no answer.
    prompt, _ = prompt_and_answer(processor, short)
    assert _decode(processor, batch["input_ids"][0, width - n:]) == _expanded(prompt)
    for row in range(2):
        assert _decode(processor, batch["input_ids"][row]).endswith("<|im_start|>assistant\n")


def test_evaluation_batch_right_padded_without_answer(processor, samples):
    batch = Collator(processor, max_length=128, train=False)(samples[:1])
    prompt, _ = prompt_and_answer(processor, samples[0])
    assert "labels" not in batch
    assert _decode(processor, batch["input_ids"][0]) == _expanded(prompt)


def test_mixed_modalities_in_one_batch(processor, samples):
    mixed = [samples[0], _text_only(samples[1]), _image_only(samples[2]), samples[3]]
    batch = Collator(processor, max_length=128, train=True)(mixed)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # one row per image present
    image_tokens = (batch["input_ids"] == _image_token_id(processor)).sum(dim=1)
    assert image_tokens.tolist() == [IMAGE_TOKENS, 0, IMAGE_TOKENS, IMAGE_TOKENS]
    texts = [_decode(processor, row) for row in batch["input_ids"]]
    assert "Note: " + samples[0]["text"] in texts[0]
    assert "Note: " + samples[1]["text"] in texts[1]
    assert "Note:" not in texts[2]
    # Every row still trains on its own answer.
    for row, sample in enumerate(mixed):
        kept = batch["labels"][row] != IGNORE_INDEX
        assert _decode(processor, batch["labels"][row][kept]) == sample["answer"] + END_OF_TURN


def test_pixel_values_follow_sample_order(processor, samples):
    collate = Collator(processor, max_length=128, train=True)
    together = collate([samples[0], _text_only(samples[1]), samples[2]])["pixel_values"]
    first, third = collate([samples[0]])["pixel_values"], collate([samples[2]])["pixel_values"]
    assert torch.equal(together, torch.cat([first, third]))


def test_text_only_batch_has_no_pixel_values(processor, samples):
    batch = Collator(processor, max_length=128, train=True)([_text_only(s) for s in samples[:2]])
    assert "pixel_values" not in batch
    assert not torch.any(batch["input_ids"] == _image_token_id(processor))


def test_user_text_note_and_options(samples, vqa_sample):
    text = user_text(samples[0])
    assert text.startswith("Note: " + samples[0]["text"])
    assert "Options: A. warm fragile B. warm sturdy C. cool fragile D. cool sturdy" in text
    assert "letter" in text
    assert "Note:" not in user_text(_image_only(samples[0]))
    open_question = user_text(vqa_sample)
    assert "Options:" not in open_question
    assert vqa_sample["question"] in open_question


def test_max_length_too_small_names_the_key(processor, samples):
    with pytest.raises(ValueError, match=r"data\.max_length=10"):
        Collator(processor, max_length=10, train=True)(samples[:1])


def test_bad_padding_side(processor):
    with pytest.raises(ValueError, match="padding_side"):
        Collator(processor, max_length=128, train=False, padding_side="middle")


def test_modality_prompts_name_what_remains_and_agnostic_prompts_do_not(processor, samples):
    full = samples[0]
    image_only, text_only = {**full, "text": None}, {**full, "image": None}
    neither = {**full, "image": None, "text": None}
    assert "based on the text and image" in user_text(full, "modality")
    assert "based on the image." in user_text(image_only, "modality")
    assert "based on the text." in user_text(text_only, "modality")
    assert "based on the question." in user_text(neither, "modality")
    agnostic = [user_text(s, "agnostic") for s in (full, image_only, text_only, neither)]
    assert all("regardless of which are missing" in t and "based on" not in t for t in agnostic)
    assert "based on" not in user_text(full) and "regardless" not in user_text(full)
    # The phrase reaches the tokens the model is trained on, and stays out of the answer.
    collate = Collator(processor, 256, train=True, prompt="agnostic")
    prompt, answer = prompt_and_answer(processor, full, "agnostic")
    assert "regardless of which are missing" in prompt and "regardless" not in answer
    batch = collate([full, text_only])
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="prompt style 'augmented'"):
        Collator(processor, 256, train=True, prompt="augmented")
