"""GLUE metrics against small cases computed by hand."""

import math

import pytest

from roformer.metrics import METRICS, accuracy, compute_metrics, f1, mcc, pearson, spearman

PREDICTIONS = [1, 0, 1, 1]
LABELS = [1, 1, 1, 0]  # TP = 2, FN = 1, FP = 1, TN = 0


def test_accuracy():
    assert accuracy(PREDICTIONS, LABELS) == pytest.approx(2 / 4)


def test_f1_of_the_positive_class():
    # precision = recall = 2/3
    assert f1(PREDICTIONS, LABELS) == pytest.approx(2 / 3)
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives at all: 0, not a warning and NaN


def test_matthews_correlation():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (0 - 1) / sqrt(3 * 3 * 1 * 1)
    assert mcc(PREDICTIONS, LABELS) == pytest.approx(-1 / 3)
    assert mcc([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert mcc([1, 1, 1, 1], LABELS) == 0.0  # a constant predictor


def test_pearson_and_spearman():
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    # deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): covariance sum 4, variance sums 5 and 5
    assert pearson(x, y) == pytest.approx(0.8)
    assert spearman(x, y) == pytest.approx(0.8)  # already ranks
    # a monotone but non-linear relation: perfect rank correlation, imperfect linear one
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9


def test_correlation_of_a_constant_prediction_is_zero_not_nan():
    assert pearson([2.5, 2.5, 2.5], [1.0, 2.0, 3.0]) == 0.0
    assert not math.isnan(spearman([2.5, 2.5, 2.5], [1.0, 2.0, 3.0]))


def test_compute_metrics_keys():
    out = compute_metrics(("accuracy", "f1"), PREDICTIONS, LABELS)
    assert out == {"accuracy": pytest.approx(0.5), "f1": pytest.approx(2 / 3)}
    assert set(METRICS) == {"accuracy", "f1", "mcc", "pearson", "spearman"}  # the keys of DESIGN.md
