"""AUROC and its bootstrap confidence interval, shared by detection and evaluation.

Both the detect stage (choosing and reporting its detector) and the evaluator (the final
report) rank scores the same way; one implementation keeps their numbers identical.
Labels are 1 for the positive class (a hallucinated answer) and 0 for the negative one;
scores are oriented so that higher means more likely positive.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

#: Confidence level of `bootstrap_ci`'s default interval.
CI_LEVEL = 0.95


def _checked(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    return y, s


def _rank_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg), ties counted as one half (midranks)."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Midranks: every member of a run of equal scores gets the run's mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; NaN when one class is absent (it is then undefined)."""
    y, s = _checked(labels, scores)
    return _rank_auroc(y, s)


def bootstrap_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the AUROC, resampling within each class.

    Stratified resampling keeps both classes in every replicate, so no replicate is
    undefined and the interval is not biased by dropped draws on small test sets. None
    when there is nothing to resample (no resamples asked for, or a class is absent).
    """
    y, s = _checked(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    if n_resamples <= 0 or pos.size == 0 or neg.size == 0:
        return None
    rng = np.random.default_rng(seed)
    y_rep = np.r_[np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)]
    values = np.empty(n_resamples)
    for i in range(n_resamples):
        draw = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        values[i] = _rank_auroc(y_rep, draw)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)
