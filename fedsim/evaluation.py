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

The work is a list of batches (``Evaluator.units``) scored into per-sample ``BatchScores``; ``combine`` pools
them into metrics. Workers can each score a shard of the batches (``evaluate_shard``) and the pooled metrics
equal one worker's ``evaluate``, number for number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim.attacks import triggered_test
from fedsim.config import AttackConfig, EvalConfig, ExperimentConfig
from fedsim.data.collator import IGNORE_INDEX, Collator, answer_token_ids
from fedsim.data.schema import OPTION_LETTERS
from fedsim.metrics import classification_metrics, exact_match, normalize_answer, token_f1
from fedsim.models.adapter import inference
from fedsim.scenarios import ModalityStep
from fedsim.seeding import rng_for

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

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
                 device: torch.device, seed: int, prompt: str = "plain", backdoor: AttackConfig | None = None):
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
        if backdoor is not None:  # scored with the ablations: the attack's success beside clean accuracy
            self.ablated[f"asr_{backdoor.trigger}"] = by_source(triggered_test(test, backdoor))

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, processor: Any, test: datasets.Dataset, device: torch.device) -> Evaluator:
        """The evaluator of a run: its eval settings, and the backdoor's success test when it has one."""
        return cls(processor, test, cfg.eval, cfg.data.max_length, device, cfg.seed, cfg.data.prompt,
                   cfg.attack if cfg.attack.kind == "backdoor" else None)

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

    def units(self, ablations: bool = True) -> list[tuple[str, str, int]]:
        """Every batch ``evaluate`` scores, as (ablation, source, first row), in order ("" is the full split);
        ``ablations=False`` leaves the ablated splits out."""
        splits = [("", self.groups), *(self.ablated.items() if ablations else ())]
        return [(ablation, source, start) for ablation, groups in splits for source, rows in groups.items()
                for start in range(0, len(rows), self.cfg.batch_size)]

    def evaluate(self, model: torch.nn.Module, ablations: bool = True) -> dict[str, float]:
        """The metrics of the test split, then (with ``ablations``) those of each ablated split prefixed with the
        ablation's name."""
        return combine(self.score(model, self.units(ablations)))

    def evaluate_shard(self, model: torch.nn.Module, index: int, count: int,
                       ablations: bool = True) -> list[BatchScores]:
        """Shard ``index`` of ``count`` (contiguous runs of batches): ``combine`` of every shard's scores, in
        shard order, equals ``evaluate``, with the same batches and therefore the same numbers."""
        units = self.units(ablations)
        return self.score(model, [units[i] for i in np.array_split(np.arange(len(units)), count)[index]])

    def score(self, model: torch.nn.Module, units: list[tuple[str, str, int]]) -> list[BatchScores]:
        with inference(model):
            return [self._score_batch(model, *unit) for unit in units]

    def _score_batch(self, model: torch.nn.Module, ablation: str, source: str, start: int) -> BatchScores:
        rows = (self.ablated[ablation] if ablation else self.groups)[source]
        samples = [rows[i] for i in range(start, min(start + self.cfg.batch_size, len(rows)))]
        scores = BatchScores(ablation, source, self.multiple_choice[source])
        if scores.multiple_choice:
            self._multiple_choice(model, samples, scores)
        else:
            self._open_answers(model, samples, scores)
        return scores

    def _multiple_choice(self, model: torch.nn.Module, samples: list[dict], out: BatchScores) -> None:
        for sample, loglik in zip(samples, self.option_loglikelihoods(model, samples)):
            probs = torch.softmax(loglik, dim=0)
            out.preds.append(int(probs.argmax()))
            out.refs.append(sample["label"])
            out.positive.append(float(probs[1]) if len(probs) == 2 else float("nan"))
        out.num_options = max(len(sample["options"]) for sample in samples)

    def _open_answers(self, model: torch.nn.Module, samples: list[dict], out: BatchScores) -> None:
        batch = {k: v.to(self.device) for k, v in self.generate_collate(samples).items()}
        generated = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                   pad_token_id=self.generate_collate.pad_id)
        texts = self.processor.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:],
                                                      skip_special_tokens=True)
        for text, sample in zip(texts, samples):
            out.matches.append(exact_match(text, sample["answer"]))
            out.f1s.append(token_f1(text, sample["answer"]))
            out.closed.append(normalize_answer(sample["answer"]) in CLOSED_ANSWERS)


@dataclass
class BatchScores:
    """One scored batch, per sample and unaveraged (predictions, references, positive-class probabilities;
    or exact matches, token F1s, closed flags), so that batches scored on different workers pool exactly:
    macro-F1 and ROC-AUC need the pooled predictions, not per-shard metrics."""

    ablation: str  # "" for the full test split
    source: str
    multiple_choice: bool
    num_options: int = 0  # multiple choice: the most options any row of the batch has
    preds: list[int] = field(default_factory=list)
    refs: list[int] = field(default_factory=list)
    positive: list[float] = field(default_factory=list)
    matches: list[bool] = field(default_factory=list)
    f1s: list[float] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)


def combine(batches: list[BatchScores]) -> dict[str, float]:
    """``Evaluator.evaluate``'s metrics from its batches' scores (in its order): per source, pooled over the
    source's batches; several sources as ``<source>/<metric>`` plus their mean accuracy; ablations prefixed."""
    splits: dict[str, dict[str, list[BatchScores]]] = {}
    for batch in batches:
        splits.setdefault(batch.ablation, {}).setdefault(batch.source, []).append(batch)
    out: dict[str, float] = {}
    for ablation, sources in splits.items():
        metrics = _source_metrics(sources)
        if ablation.startswith("asr_"):  # accuracy against the target label is the attack's success rate
            metrics = {"accuracy": metrics["accuracy"]}
        out.update(metrics if not ablation else {f"{ablation}/{name}": value for name, value in metrics.items()})
    return out


def _source_metrics(sources: dict[str, list[BatchScores]]) -> dict[str, float]:
    scores = {name: _pooled_metrics(batches) for name, batches in sources.items()}
    if len(scores) == 1:
        return next(iter(scores.values()))
    out = {f"{name}/{metric}": value for name, group in scores.items() for metric, value in group.items()}
    out["accuracy"] = float(np.mean([group["accuracy"] for group in scores.values()]))
    return out


def _pooled_metrics(batches: list[BatchScores]) -> dict[str, float]:
    def pooled(field_name: str) -> list:
        return [value for batch in batches for value in getattr(batch, field_name)]

    if batches[0].multiple_choice:
        num_classes = max(batch.num_options for batch in batches)
        return classification_metrics(pooled("preds"), pooled("refs"),
                                      pooled("positive") if num_classes == 2 else None, num_classes=num_classes)
    matches, f1s = np.array(pooled("matches"), dtype=float), np.array(pooled("f1s"))
    closed = np.array(pooled("closed"), dtype=bool)
    metrics = {"accuracy": float(matches.mean()), "token_f1": float(f1s.mean())}
    if closed.any():
        metrics["closed_accuracy"] = float(matches[closed].mean())
    if (~closed).any():
        metrics["open_accuracy"] = float(matches[~closed].mean())
        metrics["open_token_f1"] = float(f1s[~closed].mean())
    return metrics
