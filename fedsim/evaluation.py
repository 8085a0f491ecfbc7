"""Evaluate a model on a test split: option log-likelihoods for multiple choice, greedy answers for VQA.

Multiple choice is scored by the log-likelihood of each option's answer tokens given the prompt (the
tokens after the letter that every option shares, the template's end of turn, left out); the highest
wins, and the softmax over the options' log-likelihoods gives the class probabilities ROC-AUC needs. When
every option's answer is one distinct token (the common case) that is the next-token log-probability, read
from one forward pass over the prompts; otherwise each option's prompt + answer is scored as a sequence.
Open questions are answered by greedy generation and scored by exact match and token F1, overall and split
into closed (yes/no reference) and open questions, as medical VQA reports them.

``eval.max_samples`` scores a seeded random sample of the test split, kept in split order. A test split
that mixes sources (the ``modality_task`` scenario) is scored per source, each as multiple choice or open
answers by whether its rows have options: metrics are named ``<source>/<metric>``, and ``accuracy`` is the
unweighted mean of the sources' accuracies.

``eval.ablations`` also scores the split with one modality removed from every row (``no_image``: images,
``no_text``: the text notes), as the ``missing`` scenario removes it, and reports those metrics beside the
full ones as ``<ablation>/<metric>`` (``no_image/accuracy``, ``no_image/<source>/<metric>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from fedsim.config import EvalConfig
from fedsim.data.collator import IGNORE_INDEX, Collator, answer_token_ids
from fedsim.data.schema import OPTION_LETTERS
from fedsim.metrics import classification_metrics, exact_match, normalize_answer, token_f1
from fedsim.models.adapter import inference
from fedsim.scenarios import ModalityStep
from fedsim.seeding import rng_for

CLOSED_ANSWERS = ("yes", "no")
# Each ablation's (keep image, keep text).
ABLATIONS = {"no_image": (False, True), "no_text": (True, False)}


def sample_rows(test: datasets.Dataset, max_samples: int, seed: int) -> datasets.Dataset:
    """``max_samples`` rows drawn without replacement (all rows when 0 or not fewer), in split order."""
    if not max_samples or max_samples >= len(test):
        return test
    picked = rng_for(seed, "eval_sample").choice(len(test), size=max_samples, replace=False)
    return test.select(np.sort(picked).tolist())


@dataclass
class Ablation(ModalityStep):
    """Every row keeps the same modalities: a scenario step (unregistered) for the test split."""

    name = "ablation"
    keep_image: bool
    keep_text: bool

    def keep(self, client_of: np.ndarray, num_clients: int, seed: int, stream: str) -> np.ndarray:
        return np.tile([self.keep_image, self.keep_text], (len(client_of), 1))


def ablate(test: datasets.Dataset, ablation: str) -> datasets.Dataset:
    """``test`` with the modality ``ablation`` names removed from every row (rows already without it stay)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}: expected one of {', '.join(ABLATIONS)}")
    everyone = np.zeros(len(test), dtype=np.int64)  # the whole split as one client's rows
    return Ablation(*ABLATIONS[ablation]).apply(test, everyone, 1, seed=0, stream="ablation")


def by_source(test: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """The rows of each source, in order of first appearance."""
    sources = test["source"]
    return {name: test.select([i for i, s in enumerate(sources) if s == name]) for name in dict.fromkeys(sources)}


def is_multiple_choice(source: str, rows: datasets.Dataset) -> bool:
    """Whether a source's rows are multiple choice (all have options) or open questions (none has)."""
    with_options = [len(options) > 0 for options in rows["options"]]
    if any(with_options) and not all(with_options):
        raise ValueError(f"source {source!r} mixes multiple-choice rows and open questions: {sum(with_options)} "
                         f"of {len(with_options)} rows have options; give each kind its own source name")
    return all(with_options)


def without_shared_suffix(answers: list[list[int]]) -> list[list[int]]:
    """Drop the trailing tokens that every answer shares, keeping at least one token of each.

    They come from the chat template (its end of turn), are the same whichever option is meant, and would
    otherwise only add how likely the model finds the turn to end there.
    """
    shortest = min(len(tokens) for tokens in answers)
    shared = 0
    while shared < shortest - 1 and len({tokens[-1 - shared] for tokens in answers}) == 1:
        shared += 1
    return [tokens[: len(tokens) - shared] for tokens in answers]


class Evaluator:
    """Scores a model on a test split, source by source (see the module docstring)."""

    def __init__(self, processor: Any, test: datasets.Dataset, cfg: EvalConfig, max_length: int,
                 device: torch.device, seed: int, prompt: str = "plain"):
        test = sample_rows(test, cfg.max_samples, seed)
        self.processor = processor
        self.cfg = cfg
        self.device = device
        self.prompt = prompt
        self.score_collate = Collator(processor, max_length, train=False, padding_side="right", prompt=prompt)
        self.option_collate = Collator(processor, max_length, train=True, padding_side="right", prompt=prompt)
        self.generate_collate = Collator(processor, max_length, train=False, padding_side="left", prompt=prompt)
        self._option_answers: dict[int, list[list[int]]] = {}
        self.groups = by_source(test)
        self.multiple_choice = {name: is_multiple_choice(name, rows) for name, rows in self.groups.items()}
        self.ablated = {ablation: by_source(ablate(test, ablation)) for ablation in cfg.ablations}

    def option_answers(self, sample: dict) -> list[list[int]]:
        """Each option letter's answer tokens, less the suffix all options share."""
        count = len(sample["options"])
        # The answer's tokens come from the chat template's assistant turn, not from the sample's content.
        if count not in self._option_answers:
            answers = without_shared_suffix([answer_token_ids(self.processor, {**sample, "answer": OPTION_LETTERS[i]},
                                                              self.prompt) for i in range(count)])
            if len({tuple(tokens) for tokens in answers}) != count:
                raise ValueError(f"two of the option letters {OPTION_LETTERS[:count]} tokenize identically under "
                                 f"this tokenizer ({answers}); cannot tell the options apart")
            self._option_answers[count] = answers
        return self._option_answers[count]

    def option_loglikelihoods(self, model: torch.nn.Module, samples: list[dict]) -> list[torch.Tensor]:
        """Per sample, the log-likelihood of each option's answer tokens given the prompt (under ``inference``)."""
        answers = [self.option_answers(sample) for sample in samples]
        if all(len(tokens) == 1 for options in answers for tokens in options):
            return self._next_token_loglikelihoods(model, samples, answers)
        return self._sequence_loglikelihoods(model, samples, answers)

    def _next_token_loglikelihoods(self, model: torch.nn.Module, samples: list[dict],
                                   answers: list[list[list[int]]]) -> list[torch.Tensor]:
        """One forward pass over the prompts: a one-token answer's log-likelihood is a next-token log-prob."""
        batch = self._to_device(self.score_collate(samples))
        logits = model(**batch).logits
        last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
        logprobs = torch.log_softmax(logits[torch.arange(len(samples)), last].float(), dim=-1).cpu()
        return [row[[tokens[0] for tokens in options]] for row, options in zip(logprobs, answers)]

    def _sequence_loglikelihoods(self, model: torch.nn.Module, samples: list[dict],
                                 answers: list[list[list[int]]]) -> list[torch.Tensor]:
        """Score prompt + answer for every (sample, option), ``batch_size`` sequences per forward pass."""
        pairs = [(sample, option, len(tokens))
                 for sample, options in zip(samples, answers) for option, tokens in enumerate(options)]
        size = self.cfg.batch_size
        scores = torch.cat([self._answer_loglikelihoods(model, pairs[start:start + size])
                            for start in range(0, len(pairs), size)])
        return list(scores.split([len(options) for options in answers]))

    def _answer_loglikelihoods(self, model: torch.nn.Module, pairs: list[tuple[dict, int, int]]) -> torch.Tensor:
        """Sum of the log-probs of the first ``count`` answer tokens of each (sample, option, count)."""
        batch = self._to_device(self.option_collate([{**sample, "answer": OPTION_LETTERS[option]}
                                                     for sample, option, _ in pairs]))
        labels = batch.pop("labels")  # the full answer tokens, after the prompt; right padding keeps positions
        counts = torch.tensor([count for _, _, count in pairs], device=labels.device)
        answer = labels != IGNORE_INDEX
        rows, cols = (answer & (answer.cumsum(dim=1) <= counts[:, None])).nonzero(as_tuple=True)
        logits = model(**batch).logits
        # The logits at position t predict the token at t + 1; only the scored positions get a softmax.
        logprobs = torch.log_softmax(logits[rows, cols - 1].float(), dim=-1)
        token_logprobs = logprobs.gather(1, labels[rows, cols][:, None])[:, 0]
        return torch.zeros(len(pairs), device=logprobs.device).index_add_(0, rows, token_logprobs).cpu()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    def _batches(self, test: datasets.Dataset):
        for start in range(0, len(test), self.cfg.batch_size):
            yield [test[i] for i in range(start, min(start + self.cfg.batch_size, len(test)))]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The metrics of the test split, then those of each ablated split prefixed with the ablation's name."""
        with inference(model):
            out = self._score_sources(model, self.groups)
            for ablation, groups in self.ablated.items():
                out.update({f"{ablation}/{metric}": value
                            for metric, value in self._score_sources(model, groups).items()})
        return out

    def _score_sources(self, model: torch.nn.Module, groups: dict[str, datasets.Dataset]) -> dict[str, float]:
        scores = {name: self._score(name, model, test) for name, test in groups.items()}
        if len(scores) == 1:
            return next(iter(scores.values()))
        out = {f"{name}/{metric}": value for name, group in scores.items() for metric, value in group.items()}
        out["accuracy"] = float(np.mean([group["accuracy"] for group in scores.values()]))
        return out

    def _score(self, name: str, model: torch.nn.Module, test: datasets.Dataset) -> dict[str, float]:
        if self.multiple_choice[name]:
            return self._multiple_choice(model, test)
        return self._open_answers(model, test)

    def _multiple_choice(self, model: torch.nn.Module, test: datasets.Dataset) -> dict[str, float]:
        preds, refs, positive = [], [], []
        for samples in self._batches(test):
            for sample, loglik in zip(samples, self.option_loglikelihoods(model, samples)):
                probs = torch.softmax(loglik, dim=0)
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
