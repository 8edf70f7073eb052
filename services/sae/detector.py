"""The detector and the dense-probe baseline: question-level split, logistic regressions.

The split is by question, never by answer or token: several answers to one question (and
every token of one answer) share almost everything, so letting them straddle the split
would score memory of the question, not detection. Questions are stratified by the label
of their greedy answer, so both classes reach both sides whenever each has two questions.

Everything that is fitted (the detector, the dense probe, the choice of the probe's
layer) sees the train split only; the test split is touched once, to be scored.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.auroc import auroc

TRAIN, TEST = "train", "test"
#: Folds of the cross-validation that picks the dense probe's layer (fewer when a class
#: has fewer questions in the train split).
CV_FOLDS = 5


def split_by_question(
    greedy_label: Mapping[str, str],
    test_fraction: float,
    seed: int,
    group_of: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """question id -> "train" | "test", stratified by the label of its greedy answer.

    Questions of one group (`group_of`; by default each question is its own) go to one
    side together: a confusable twin and the known land it is named after have all but
    identical hidden states and opposite labels, and split apart they let every fitted
    score learn the entity rather than the invention (on configs/facts-confusable.yaml,
    with twins split apart, the SAE detector, the combined one and the dense probe all
    ranked the test answers below chance: AUROC 0.29-0.39). Groups are stratified by their
    members' greedy labels; each stratum gives round(test_fraction * size) of its groups
    to test, at least one and never all when it has two or more.
    """
    group_of = group_of or {}
    members: dict[str, list[str]] = {}
    for qid in sorted(greedy_label):
        members.setdefault(group_of.get(qid, qid), []).append(qid)
    rng = random.Random(f"driftlab-detect-split-{seed}")
    strata: dict[tuple[str, ...], list[str]] = {}
    for group in sorted(members):
        labels = tuple(sorted(greedy_label[qid] for qid in members[group]))
        strata.setdefault(labels, []).append(group)
    split: dict[str, str] = {}
    for labels in sorted(strata):
        groups = strata[labels]
        rng.shuffle(groups)
        n = len(groups)
        n_test = 0 if n < 2 else min(n - 1, max(1, round(test_fraction * n)))
        for i, group in enumerate(groups):
            split.update({qid: TEST if i < n_test else TRAIN for qid in members[group]})
    return split


def logistic(seed: int) -> Pipeline:
    """Standardised inputs, L2-penalised logistic regression, classes weighted equally."""
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=seed),
    )


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """P(hallucinated) for every row of `x`, from a logistic regression fitted on train."""
    model = logistic(seed).fit(x_train, y_train)
    scores: np.ndarray = model.predict_proba(x)[:, 1]
    return scores


def cross_validated_auroc(x: np.ndarray, y: np.ndarray, groups: Sequence[str], seed: int) -> float:
    """AUROC of out-of-fold predictions, folds grouped by question and stratified."""
    n_questions = {
        label: len({g for g, yy in zip(groups, y, strict=True) if yy == label}) for label in (0, 1)
    }
    folds = min(CV_FOLDS, n_questions[0], n_questions[1])
    if folds < 2:
        return float("nan")
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = np.empty(len(y))
    for fit_rows, held_rows in cv.split(x, y, groups):
        if len(set(y[fit_rows].tolist())) < 2:
            out[held_rows] = 0.5
            continue
        out[held_rows] = fit_and_score(x[fit_rows], y[fit_rows], x[held_rows], seed)
    return auroc(y, out)


def best_layer(
    per_layer: Sequence[np.ndarray], y: np.ndarray, groups: Sequence[str], seed: int
) -> tuple[int, list[float]]:
    """The layer whose features cross-validate best on the train rows, and every layer's AUROC.

    Ties (and layers whose cross-validation is undefined) go to the earlier layer.
    """
    scores = [cross_validated_auroc(x, y, groups, seed) for x in per_layer]
    finite = [s if np.isfinite(s) else -1.0 for s in scores]
    return int(np.argmax(finite)), scores
