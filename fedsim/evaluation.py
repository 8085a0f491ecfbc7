"""Evaluate a model on a test split: option-letter scoring for multiple choice, greedy answers for VQA.

Multiple choice is scored by the next-token distribution restricted to the options' first answer tokens
(one forward pass; the standard for multiple-choice benchmarks), which also gives the class scores that
ROC-AUC needs. Open questions are answered by greedy generation and scored by exact match and token F1.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch

from fedsim.config import EvalConfig
from fedsim.data.collator import Collator, answer_token_ids
from fedsim.data.schema import OPTION_LETTERS
from fedsim.metrics import classification_metrics, exact_match, token_f1
from fedsim.models.adapter import inference


class Evaluator:
    def __init__(self, processor: Any, test: datasets.Dataset, num_classes: int, cfg: EvalConfig,
                 max_length: int, device: torch.device):
        if cfg.max_samples:
            test = test.select(range(min(cfg.max_samples, len(test))))
        self.test = test
        self.processor = processor
        self.num_classes = num_classes
        self.cfg = cfg
        self.device = device
        self.score_collate = Collator(processor, max_length, train=False, padding_side="right")
        self.generate_collate = Collator(processor, max_length, train=False, padding_side="left")
        self._option_ids: dict[int, list[int]] = {}

    def _option_token_ids(self, sample: dict) -> list[int]:
        """First answer token of each option letter (what the model must emit first)."""
        count = len(sample["options"])
        if count not in self._option_ids:
            ids = [answer_token_ids(self.processor, {**sample, "answer": OPTION_LETTERS[i]})[0] for i in range(count)]
            if len(set(ids)) != count:
                raise ValueError("option letters share their first token under this tokenizer; cannot score them")
            self._option_ids[count] = ids
        return self._option_ids[count]

    def _batches(self):
        for start in range(0, len(self.test), self.cfg.batch_size):
            yield [self.test[i] for i in range(start, min(start + self.cfg.batch_size, len(self.test)))]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        with inference(model):
            if len(self.test[0]["options"]) > 0:
                return self._multiple_choice(model)
            return self._open_answers(model)

    def _multiple_choice(self, model: torch.nn.Module) -> dict[str, float]:
        preds, refs, positive = [], [], []
        for samples in self._batches():
            batch = {k: v.to(self.device) for k, v in self.score_collate(samples).items()}
            logits = model(**batch).logits.float()
            last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
            next_token = logits[torch.arange(len(samples)), last]
            for row, sample in zip(next_token, samples):
                option_logits = row[self._option_token_ids(sample)]
                probs = torch.softmax(option_logits, dim=0)
                preds.append(int(probs.argmax()))
                refs.append(sample["label"])
                positive.append(float(probs[1]) if len(probs) == 2 else float("nan"))
        scores = positive if self.num_classes == 2 else None
        return classification_metrics(preds, refs, scores, num_classes=self.num_classes)

    def _open_answers(self, model: torch.nn.Module) -> dict[str, float]:
        tokenizer = self.processor.tokenizer
        matches, f1s = [], []
        for samples in self._batches():
            batch = {k: v.to(self.device) for k, v in self.generate_collate(samples).items()}
            out = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=self.generate_collate.pad_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, sample in zip(texts, samples):
                matches.append(exact_match(text, sample["answer"]))
                f1s.append(token_f1(text, sample["answer"]))
        return {"accuracy": float(np.mean(matches)), "token_f1": float(np.mean(f1s))}
