"""Chance levels (fedsim.chance) of test splits: guessing among each row's options, per source as evaluated."""

from __future__ import annotations

import datasets

from fedsim.chance import chance_metrics
from fedsim.data.synthetic import generate

from conftest import small_config


def with_options(rows: datasets.Dataset, source: str, counts: list[int]) -> datasets.Dataset:
    """``rows`` renamed to ``source``, row i keeping its first ``counts[i]`` options (label within them)."""
    return rows.map(lambda row, i: {"options": row["options"][:counts[i]], "label": row["label"] % counts[i],
                                    "source": source}, with_indices=True)


def test_chance_is_the_mean_of_one_over_each_rows_options_per_multiple_choice_source(tmp_path):
    cfg = small_config(tmp_path)
    classification, textqa = generate("classification", 4, "test", 0), generate("textqa", 3, "test", 0)
    assert chance_metrics(cfg, classification) == {"accuracy": 0.25}  # 4 options, whatever the labels drawn
    pairs = with_options(classification, "pairs", [2, 2, 2, 2])
    assert chance_metrics(cfg, pairs) == {"accuracy": 0.5, "roc_auc": 0.5}  # binary: ROC-AUC is evaluated too
    assert chance_metrics(cfg, with_options(classification, "mixed", [2, 4, 4, 2])) == {"accuracy": 0.375}
    # Several sources are named as the evaluator names them; the mean accuracy only when all are multiple choice.
    assert chance_metrics(cfg, datasets.concatenate_datasets([classification, pairs])) == {
        "synthetic/classification/accuracy": 0.25, "pairs/accuracy": 0.5, "pairs/roc_auc": 0.5, "accuracy": 0.375}
    assert chance_metrics(cfg, datasets.concatenate_datasets([classification, textqa])) == {
        "synthetic/classification/accuracy": 0.25}  # open yes/no answers are generated: no chance level
    assert chance_metrics(cfg, textqa) == {}
