"""Evaluate a model on a test split: option-letter scoring for multiple choice, greedy answers for VQA.

Multiple choice is scored by the next-token distribution restricted to the options' first answer tokens
(one forward pass; the standard for multiple-choice benchmarks), which also gives the class scores that
ROC-AUC needs. Open questions are answered by greedy generation and scored by exact match and token F1,
overall and split into closed (yes/no reference) and open questions, as medical VQA reports them.

A test split that mixes sources (the ``modality_task`` scenario) is scored per source: metrics are named
``<source>/<metric>``, and ``accuracy`` is the unweighted mean of the sources' accuracies.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch

from fedsim.config import EvalConfig
from fedsim.data.collator import Collator, answer_token_ids
from fedsim.data.schema import OPTION_LETTERS
from fedsim.metrics import classification_metrics, exact_match, normalize_answer, token_f1
from fedsim.models.adapter import inference

CLOSED_ANSWERS = ("yes", "no")


class Evaluator:
    def __init__(self, processor: Any, test: datasets.Dataset, cfg: EvalConfig, max_length: int,
                 device: torch.device, prompt: str = "plain"):
        if cfg.max_samples:
            test = test.select(range(min(cfg.max_samples, len(test))))
        self.processor = processor
        self.cfg = cfg
        self.device = device
        self.prompt = prompt
        self.score_collate = Collator(processor, max_length, train=False, padding_side="right", prompt=prompt)
        self.generate_collate = Collator(processor, max_length, train=False, padding_side="left", prompt=prompt)
        self._option_ids: dict[int, list[int]] = {}
        sources = test["source"]
        self.groups = {name: test.select([i for i, s in enumerate(sources) if s == name])
                       for name in dict.fromkeys(sources)}

    def _option_token_ids(self, sample: dict) -> list[int]:
        """First answer token of each option letter (what the model must emit first)."""
        count = len(sample["options"])
        if count not in self._option_ids:
            ids = [answer_token_ids(self.processor, {**sample, "answer": OPTION_LETTERS[i]}, self.prompt)[0]
                   for i in range(count)]
            if len(set(ids)) != count:
                raise ValueError("option letters share their first token under this tokenizer; cannot score them")
            self._option_ids[count] = ids
        return self._option_ids[count]

    def _batches(self, test: datasets.Dataset):
        for start in range(0, len(test), self.cfg.batch_size):
            yield [test[i] for i in range(start, min(start + self.cfg.batch_size, len(test)))]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        with inference(model):
            scores = {name: self._score(model, test) for name, test in self.groups.items()}
        if len(scores) == 1:
            return next(iter(scores.values()))
        out = {f"{name}/{metric}": value for name, group in scores.items() for metric, value in group.items()}
        out["accuracy"] = float(np.mean([group["accuracy"] for group in scores.values()]))
        return out

    def _score(self, model: torch.nn.Module, test: datasets.Dataset) -> dict[str, float]:
        if len(test[0]["options"]) > 0:
            return self._multiple_choice(model, test)
        return self._open_answers(model, test)

    def _multiple_choice(self, model: torch.nn.Module, test: datasets.Dataset) -> dict[str, float]:
        preds, refs, positive = [], [], []
        for samples in self._batches(test):
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
        num_classes = max(len(options) for options in test["options"])
        return classification_metrics(preds, refs, positive if num_classes == 2 else None, num_classes=num_classes)

    def _open_answers(self, model: torch.nn.Module, test: datasets.Dataset) -> dict[str, float]:
        tokenizer = self.processor.tokenizer
        matches, f1s, closed = [], [], []
        for samples in self._batches(test):
            batch = {k: v.to(self.device) for k, v in self.generate_collate(samples).items()}
            out = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=self.generate_collate.pad_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, sample in zip(texts, samples):
                matches.append(exact_match(text, sample["answer"]))
                f1s.append(token_f1(text, sample["answer"]))
                closed.append(normalize_answer(sample["answer"]) in CLOSED_ANSWERS)
        matches, f1s, closed = np.array(matches, dtype=float), np.array(f1s), np.array(closed)
        metrics = {"accuracy": float(matches.mean()), "token_f1": float(f1s.mean())}
        if closed.any():
            metrics["closed_accuracy"] = float(matches[closed].mean())
        if (~closed).any():
            metrics["open_accuracy"] = float(matches[~closed].mean())
            metrics["open_token_f1"] = float(f1s[~closed].mean())
        return metrics
