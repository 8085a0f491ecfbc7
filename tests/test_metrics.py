import math

import pytest

from fedsim.metrics import (accuracy, classification_metrics, exact_match, macro_f1, normalize_answer,
                            roc_auc, token_f1)


@pytest.mark.parametrize("text, expected", [
    ("  The Quick, Brown fox!  ", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("theater", "theater"),  # articles only as whole words
    ("two\t\n  dogs.", "two dogs"),
    ("", ""),
    ("The.", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower")
    assert not exact_match("eiffel", "eiffel tower")


def test_token_f1():
    # pred -> "cat sat on mat" (4 tokens), ref -> "cat on mat" (3); overlap 3.
    # P = 3/4, R = 3/3, F1 = 2 * 0.75 * 1 / 1.75 = 6/7
    assert token_f1("The cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # Multiset overlap: pred "red red" vs ref "red": overlap 1, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("red red", "red") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "the") == 1.0  # both normalize to empty
    assert token_f1("", "red") == 0.0
    assert token_f1("red", "") == 0.0


def test_accuracy():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert accuracy(["a", "b"], ["a", "c"]) == 0.5
    with pytest.raises(ValueError, match="length"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_macro_f1_three_classes():
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 2]
    # class 0: TP=1 (i0), FP=1 (i4), FN=1 (i1) -> F1 = 2/(2+1+1) = 1/2
    # class 1: TP=2 (i2,i3), FP=1 (i1), FN=0    -> F1 = 4/(4+1)   = 4/5
    # class 2: TP=1 (i5), FP=0, FN=1 (i4)       -> F1 = 2/(2+1)   = 2/3
    # macro = (1/2 + 4/5 + 2/3) / 3 = (59/30) / 3 = 59/90
    assert macro_f1(preds, refs) == pytest.approx(59 / 90)
    assert macro_f1(preds, refs, num_classes=3) == pytest.approx(59 / 90)
    # num_classes=4: class 3 never occurs, scores 0 and counts -> (59/30) / 4 = 59/120
    assert macro_f1(preds, refs, num_classes=4) == pytest.approx(59 / 120)


def test_macro_f1_edge_cases():
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0
    # Class 1 only predicted (FP=1, F1=0); class 0: TP=1, FN=1 -> 2/3; mean over present {0,1} = 1/3
    assert macro_f1([0, 1], [0, 0]) == pytest.approx(1 / 3)
    # Out-of-range prediction -1: not a class, but a miss for class 0 -> F1_0 = 0, F1_1 = 1, mean 1/2
    assert macro_f1([-1, 1], [0, 1], num_classes=2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        macro_f1([0], [0, 1])


def test_roc_auc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4:
    # 0.35>0.1 (1), 0.35<0.4 (0), 0.8>0.1 (1), 0.8>0.4 (1) -> 3/4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half():
    # positives 0.5, 0.9 vs negatives 0.5, 0.2:
    # 0.5=0.5 (1/2), 0.5>0.2 (1), 0.9>0.5 (1), 0.9>0.2 (1) -> 3.5/4
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    # All scores equal: every pair ties -> 1/2
    assert roc_auc([0.3, 0.3, 0.3], [0, 1, 1]) == pytest.approx(0.5)
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0


def test_roc_auc_single_class_error():
    with pytest.raises(ValueError, match="only one class"):
        roc_auc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="only one class"):
        roc_auc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0.1, 0.2], [0, 2])


def test_classification_metrics():
    preds, refs, scores = [0, 0, 1, 1], [0, 1, 1, 1], [0.2, 0.6, 0.7, 0.9]
    out = classification_metrics(preds, refs, positive_scores=scores, num_classes=2)
    # accuracy 3/4; class 0: TP1 FP1 FN0 -> 2/3; class 1: TP2 FP0 FN1 -> 4/5; macro 22/30 = 11/15
    # AUC: positive scores 0.6,0.7,0.9 all beat negative 0.2 -> 1
    assert out == pytest.approx({"accuracy": 0.75, "macro_f1": 11 / 15, "roc_auc": 1.0})
    assert set(classification_metrics(preds, refs, num_classes=2)) == {"accuracy", "macro_f1"}
    assert set(classification_metrics(preds, refs, scores, num_classes=3)) == {"accuracy", "macro_f1"}
    single = classification_metrics([1, 1], [1, 1], positive_scores=[0.3, 0.4], num_classes=2)
    assert math.isnan(single["roc_auc"])


def test_classification_macro_f1_averages_over_classes_present():
    # 4 options, classes 2 and 3 in neither truth nor predictions: they do not count (scikit-learn's default).
    # class 0: TP1 FP1 FN0 -> 2/3; class 1: TP0 FP0 FN1 -> 0; macro over {0, 1} = 1/3 (not 1/6 over 4 classes)
    out = classification_metrics([0, 0], [0, 1], num_classes=4)
    assert out["macro_f1"] == pytest.approx(1 / 3)
