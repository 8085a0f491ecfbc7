"""Evaluation metrics: SQuAD-style answer matching for VQA, and classification scores.

Plain Python and numpy. Macro-F1 follows the usual convention, scikit-learn's ``f1_score(average="macro",
zero_division=0)``: the unweighted mean of per-class F1 over the classes present in the true labels or the
predictions, so a class (an option) that neither holds does not count. ``roc_auc`` is the Mann-Whitney
statistic with ties counted 1/2.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, remove punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> bool:
    """True when the normalized answers are identical."""
    return normalize_answer(pred) == normalize_answer(ref)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token-overlap F1 on normalized text; 1.0 if both are empty, 0.0 if only one is.

    With ``c`` the multiset overlap of tokens: ``P = c/|pred|``, ``R = c/|ref|``, ``F1 = 2PR/(P+R)``.
    """
    pred_toks, ref_toks = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not pred_toks or not ref_toks:
        return float(pred_toks == ref_toks)
    common = sum((Counter(pred_toks) & Counter(ref_toks)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_toks), common / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def accuracy(preds: Sequence, refs: Sequence) -> float:
    """Fraction of positions where ``preds[i] == refs[i]``."""
    _check_pair(preds, refs, "preds", "refs")
    return sum(p == r for p, r in zip(preds, refs)) / len(refs)


def macro_f1(preds: Sequence[int], refs: Sequence[int], num_classes: int | None = None) -> float:
    """Unweighted mean over classes of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` (0 when that is 0/0).

    Classes are the sorted union of labels in ``refs`` and ``preds`` (scikit-learn's default), or
    ``0..num_classes-1`` when given, as with ``labels=range(num_classes)``: then a listed class that never
    occurs in either sequence scores 0 and still counts in the mean, and a label outside the list (say -1
    for an unparseable answer) is no class of its own but still counts as a miss for the true class.
    """
    _check_pair(preds, refs, "preds", "refs")
    p, r = np.asarray(preds), np.asarray(refs)
    classes = np.arange(num_classes) if num_classes is not None else np.union1d(p, r)
    if len(classes) == 0:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    scores = []
    for c in classes:
        tp = int(np.sum((p == c) & (r == c)))
        fp = int(np.sum((p == c) & (r != c)))
        fn = int(np.sum((p != c) & (r == c)))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Binary ROC-AUC = P(score of a random positive > score of a random negative), ties counting 1/2.

    Computed from average ranks: ``AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``.
    ``labels`` are 0 (negative) or 1 (positive).
    """
    _check_pair(scores, labels, "scores", "labels")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"roc_auc needs binary labels in {{0, 1}}, got values {sorted(set(y.tolist()))}")
    if np.isnan(s).any():
        raise ValueError("roc_auc got NaN scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        present = "positive (1)" if n_neg == 0 else "negative (0)"
        raise ValueError(f"roc_auc is undefined when only one class is present in labels: all "
                         f"{len(y)} labels are {present}")
    return float((_average_ranks(s)[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(pred_labels: Sequence[int], true_labels: Sequence[int],
                           positive_scores: Sequence[float] | None = None,
                           num_classes: int | None = None) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (over the classes present), plus ``roc_auc`` for a binary task
    (``num_classes == 2``) given positive-class scores.

    ``roc_auc`` is NaN (with a warning) when the true labels hold a single class, so that evaluating a
    small or skewed split reports rather than aborts.
    """
    out = {"accuracy": float(accuracy(pred_labels, true_labels)),
           "macro_f1": macro_f1(pred_labels, true_labels)}
    if num_classes == 2 and positive_scores is not None:
        if len(set(np.asarray(true_labels).tolist())) < 2:
            log.warning("roc_auc undefined: only one class present in true labels; reporting NaN")
            out["roc_auc"] = float("nan")
        else:
            out["roc_auc"] = roc_auc(positive_scores, true_labels)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start of each run of equal values; run k covers ranks starts[k]+1 .. ends[k].
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _check_pair(a: Sequence, b: Sequence, a_name: str, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} and {b_name} differ in length: {len(a)} vs {len(b)}")
    if len(b) == 0:
        raise ValueError(f"{a_name} and {b_name} are empty")
