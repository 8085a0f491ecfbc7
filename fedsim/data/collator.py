"""Prompts through the processor's chat template, and batches with the loss on answer tokens only.

Each sample is processed alone (text + its image, if any) and the results are padded together, so one
code path serves batches that mix image+text, text-only and image-only samples. Vision inputs are
concatenated along the first dimension (LLaVA, Gemma3: one row per image; Qwen2-VL: patches, with one
``image_grid_thw`` row per image); where samples differ in the other dimensions (Idefics3/SmolVLM:
``(1, images, C, H, W)`` with a varying number of image crops) they are zero-padded first, as the
processor itself pads a batch: the model drops all-zero images and ``pixel_attention_mask`` marks padding.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.data.schema import OPTION_LETTERS

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "attention_mask")
# Per-token type ids (0 = text) that some models need next to input_ids: Qwen2-VL's M-RoPE positions,
# Gemma3's bidirectional attention over image tokens.
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


# How a prompt refers to the modalities a sample holds (``data.prompt``). ``modality`` names the ones
# present, as FedMLLM's baseline prompts do; ``agnostic`` is FedMLLM's prompt augmentation: one phrase for
# every sample, whatever it holds, so that all clients see one prompt distribution.
MODALITY_PHRASES = {(True, True): "Answer based on the text and image.", (True, False): "Answer based on the image.",
                    (False, True): "Answer based on the text.", (False, False): "Answer based on the question."}
AGNOSTIC_PHRASE = "Answer from whatever is given, image, text or both, regardless of which are missing."
PROMPT_STYLES = ("plain", "modality", "agnostic")


def check_prompt_style(prompt: str) -> None:
    if prompt not in PROMPT_STYLES:
        raise ValueError(f"prompt style {prompt!r} is unknown: expected one of {', '.join(PROMPT_STYLES)}")


def modality_phrase(sample: dict, prompt: str) -> str | None:
    check_prompt_style(prompt)
    if prompt == "modality":
        return MODALITY_PHRASES[(sample["image"] is not None, sample["text"] is not None)]
    return AGNOSTIC_PHRASE if prompt == "agnostic" else None


def user_text(sample: dict, prompt: str = "plain") -> str:
    """The user turn's text: context note, question, the modality phrase of the prompt style and, for
    multiple choice, the lettered options."""
    parts = []
    if sample["text"] is not None:
        parts.append(f"Note: {sample['text']}")
    parts.append(sample["question"])
    phrase = modality_phrase(sample, prompt)
    if phrase:
        parts.append(phrase)
    if sample["options"]:
        parts.append("Options: " + " ".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(sample["options"])))
        parts.append("Answer with the option's letter.")
    return "\n".join(parts)


def build_messages(sample: dict, with_answer: bool, prompt: str = "plain") -> list[dict]:
    content: list[dict] = [{"type": "image"}] if sample["image"] is not None else []
    content.append({"type": "text", "text": user_text(sample, prompt)})
    messages = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": sample["answer"]}]})
    return messages


def prompt_and_answer(processor: Any, sample: dict, prompt: str = "plain") -> tuple[str, str]:
    """Render the chat template; the answer is what the full conversation adds after the generation prompt
    (the answer plus the template's end-of-turn marker, so the model learns to stop)."""
    rendered = processor.apply_chat_template(build_messages(sample, False, prompt), add_generation_prompt=True,
                                             tokenize=False)
    full = processor.apply_chat_template(build_messages(sample, True, prompt), tokenize=False)
    if not full.startswith(rendered):
        raise ValueError("the chat template renders the prompt differently with and without the answer; "
                         "fedsim needs the answer to extend the generation prompt")
    return rendered, full[len(rendered):]


def answer_token_ids(processor: Any, sample: dict, prompt: str = "plain") -> list[int]:
    _, answer = prompt_and_answer(processor, sample, prompt)
    return processor.tokenizer(answer, add_special_tokens=False)["input_ids"]


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding every other dimension (at its end) to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            out = t.new_zeros((t.shape[0], *shape))
            out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
            t = out
        padded.append(t)
    return torch.cat(padded)


class Collator:
    """Turns schema samples into model inputs.

    ``train=True``: prompt + answer, labels masked to the answer tokens.
    ``train=False``: prompt only, for next-token scoring (right padding) or generation (left padding).
    ``prompt``: how prompts refer to modalities (PROMPT_STYLES).
    """

    def __init__(self, processor: Any, max_length: int, train: bool, padding_side: str = "right",
                 prompt: str = "plain"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        check_prompt_style(prompt)
        self.processor = processor
        self.prompt = prompt
        self.max_length = max_length
        self.train = train
        self.padding_side = padding_side
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, sample: dict) -> dict[str, torch.Tensor]:
        prompt, answer = prompt_and_answer(self.processor, sample, self.prompt)
        images = [sample["image"].convert("RGB")] if sample["image"] is not None else None
        encoded = dict(self.processor(text=prompt, images=images, return_tensors="pt", add_special_tokens=False))
        ids = encoded["input_ids"][0]
        labels = torch.full_like(ids, IGNORE_INDEX)
        token_types = {k: encoded[k][0] for k in TOKEN_TYPE_KEYS if k in encoded}
        if self.train:
            answer_ids = torch.tensor(self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"],
                                      dtype=ids.dtype)
            ids = torch.cat([ids, answer_ids])
            labels = torch.cat([labels, answer_ids])
            token_types = {k: torch.cat([t, torch.zeros_like(answer_ids, dtype=t.dtype)])  # answers are text
                           for k, t in token_types.items()}
        if ids.numel() > self.max_length:
            raise ValueError(f"a sample needs {ids.numel()} tokens, more than data.max_length={self.max_length}; "
                             "raise data.max_length")
        encoded.update(token_types, input_ids=ids, labels=labels)
        return encoded

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.batch([self.encode(s) for s in samples])

    def batch(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Encoded samples (``encode``'s) padded into one batch; new tensors, the encoded ones untouched."""
        width = max(e["input_ids"].numel() for e in encoded)
        batch: dict[str, torch.Tensor] = {}
        batch["input_ids"] = self._pad([e["input_ids"] for e in encoded], width, self.pad_id)
        batch["attention_mask"] = self._pad([torch.ones_like(e["input_ids"]) for e in encoded], width, 0)
        if self.train:
            batch["labels"] = self._pad([e["labels"] for e in encoded], width, IGNORE_INDEX)
        for key in TOKEN_TYPE_KEYS:
            if any(key in e for e in encoded):  # a text-only sample may lack them: all text, type 0
                batch[key] = self._pad([e.get(key, torch.zeros_like(e["input_ids"])) for e in encoded], width, 0)
        vision_keys = {k for e in encoded for k in e} - set(TEXT_KEYS) - set(TOKEN_TYPE_KEYS) - {"labels"}
        for key in sorted(vision_keys):
            batch[key] = concat_padded([e[key] for e in encoded if key in e])
        return batch

    def _pad(self, rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : row.numel()] = row
            else:
                out[i, width - row.numel():] = row
        return out
