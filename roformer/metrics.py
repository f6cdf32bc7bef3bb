"""Evaluation metrics: the GLUE scores (sklearn / scipy), keyed as in metrics.jsonl (`eval/<name>`).

Every function takes 1-D arrays of the same length N and returns a float in the metric's natural range
(accuracy and F1 in [0, 1], correlations in [-1, 1]); tables scale them to the paper's percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Share of exact matches. predictions, labels: (N,) class ids."""
    return float(skm.accuracy_score(labels, predictions))


def f1(predictions: Sequence, labels: Sequence) -> float:
    """Binary F1 of the positive class 1 (MRPC paraphrase, QQP duplicate), as GLUE scores it."""
    return float(skm.f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def mcc(predictions: Sequence, labels: Sequence) -> float:
    """Matthews correlation (CoLA); 0 when either side is constant."""
    return float(skm.matthews_corrcoef(labels, predictions))


def _correlation(fn, predictions: Sequence, labels: Sequence) -> float:
    predictions, labels = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    # A constant side leaves the correlation undefined (scipy returns NaN and warns); score it 0 like MCC
    # does, so best-checkpoint comparisons and JSON logs stay numeric.
    if predictions.size < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(predictions, labels)[0])


def pearson(predictions: Sequence, labels: Sequence) -> float:
    """Pearson correlation of real-valued scores (STS-B)."""
    return _correlation(stats.pearsonr, predictions, labels)


def spearman(predictions: Sequence, labels: Sequence) -> float:
    """Spearman rank correlation of real-valued scores (STS-B, the paper's column)."""
    return _correlation(stats.spearmanr, predictions, labels)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(names: Sequence[str], predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """{name: value} for each metric in `names` (keys of METRICS)."""
    return {name: METRICS[name](predictions, labels) for name in names}
