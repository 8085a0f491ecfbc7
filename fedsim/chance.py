"""Chance levels: what guessing scores on a run's test split, for the evaluation metrics where that is defined.

A multiple-choice row is scored by the option the model ranks first (fedsim.evaluation); a model that knows
nothing ranks them at random and is right with probability 1 / (the row's options), so a split's chance
accuracy is the mean of that over the rows the evaluator scores: 1 / K when every row has K options (25% for
the synthetic classification task). Random scores give a ROC-AUC of 0.5.

Not the majority-class rate: the synthetic generator draws the class from two fair coins (fedsim/data/
synthetic.py), so the most common class of a finite test split is sampling noise above 1 / K (37.5% on an
8-row split), and picking it would read the test labels. On a real source with skewed classes (CrisisMMD's
humanitarian classes) a model that learned only the class prior scores above this line: it is the level of
guessing, not of the best input-blind answer.

Left out: macro-F1 (uniform guessing's expected value depends on the class frequencies, with no closed form)
and every metric of open questions (generated answers: no set of options to guess among). A split that mixes
sources is named as the evaluator names it (``<source>/accuracy``), and its ``accuracy`` (the mean of the
sources' accuracies) has a chance level only when every source is multiple choice. Ablated metrics
(``no_image/accuracy``) share the full metric's level: removing a modality leaves the options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.evaluation import by_source, is_multiple_choice, sample_rows

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets


def guessing_metrics(rows: datasets.Dataset) -> dict[str, float]:
    """The chance levels of one multiple-choice source's metrics."""
    counts = [len(options) for options in rows["options"]]
    out = {"accuracy": float(np.mean([1 / count for count in counts]))}
    if max(counts) == 2:  # the evaluator reports roc_auc for two-option sources only
        out["roc_auc"] = 0.5
    return out


def chance_metrics(cfg: ExperimentConfig, test: datasets.Dataset) -> dict[str, float]:
    """The chance level of each metric the run's evaluation reports that has one, for the rows it scores."""
    groups = by_source(sample_rows(test, cfg.eval.max_samples, cfg.seed))
    levels = {name: guessing_metrics(rows) for name, rows in groups.items() if is_multiple_choice(name, rows)}
    if len(groups) == 1:
        return next(iter(levels.values()), {})
    out = {f"{name}/{metric}": value for name, source in levels.items() for metric, value in source.items()}
    if len(levels) == len(groups):
        out["accuracy"] = float(np.mean([source["accuracy"] for source in levels.values()]))
    return out
