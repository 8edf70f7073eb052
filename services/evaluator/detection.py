"""How well the hallucination detector and its baselines separate the detect stage's answers.

The detect stage writes one score per answer and scorer (`detect/scores.jsonl`), every
score oriented so that higher means "more likely hallucinated". Here the positive class is
`hallucinated`, the negative `correct`; `no-answer` rows have no truth to be scored against
and are only counted. Ranking quality (AUROC with a bootstrap interval, PR-AUC) is measured
on the test split; the decision threshold is chosen on the train split
(`evaluate.threshold`) and only applied to the test split, so precision, recall and F1 are
what a user of that threshold would see on new answers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_curve,
)

from shared import layout, stage_registry
from shared.auroc import CI_LEVEL, auroc, bootstrap_ci
from shared.errors import ArtifactNotFound, DriftlabError, JsonLinesError
from shared.spec import EvaluateSpec
from shared.store import Store

POSITIVE, NEGATIVE, NO_ANSWER = "hallucinated", "correct", "no-answer"
DETECTOR = "detector"
BASELINE_PREFIX = "baseline_"


class DetectionDataError(DriftlabError):
    """`detect/scores.jsonl` that does not follow its format."""


@dataclass(frozen=True)
class Scores:
    """One scorer's scores of the labelled answers of one split."""

    labels: np.ndarray
    values: np.ndarray


def kind_of(name: str) -> str:
    if name.startswith(DETECTOR):  # the SAE detector and the combined one
        return "detector"
    return "baseline" if name.startswith(BASELINE_PREFIX) else "signal"


def load_rows(store: Store, run_id: str) -> list[dict[str, Any]]:
    key = layout.detect_scores_key(run_id)

    def not_a_score_row(number: int, reason: object) -> DetectionDataError:
        return DetectionDataError(
            f"{store.url_of(key)} line {number} is not a score row ({reason}): rerun "
            f"`{stage_registry.DETECT.command(run_id, store.url)} --force`"
        )

    try:
        lines = store.get_jsonl_lines(key)
    except JsonLinesError as err:
        raise not_a_score_row(err.line_number, err.reason) from None
    rows = []
    for number, row in lines:
        try:
            if row["split"] not in ("train", "test") or row["label"] not in (
                POSITIVE,
                NEGATIVE,
                NO_ANSWER,
            ):
                raise ValueError(f"split {row['split']!r}, label {row['label']!r}")
            scores = {str(k): float(v) for k, v in row["scores"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise not_a_score_row(number, err) from None
        rows.append({**row, "scores": scores})
    return rows


def split_scores(rows: list[dict[str, Any]], name: str, split: str) -> Scores:
    """Labels (1 = hallucinated) and finite scores of `name` on `split`, no-answers left out."""
    labels, values = [], []
    for row in rows:
        value = row["scores"].get(name)
        if row["split"] != split or row["label"] == NO_ANSWER or value is None:
            continue
        if np.isfinite(value):
            labels.append(1 if row["label"] == POSITIVE else 0)
            values.append(value)
    return Scores(np.asarray(labels, dtype=np.int64), np.asarray(values, dtype=np.float64))


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts at `threshold`, an answer predicted hallucinated when its score is >= it."""
    tn, fp, fn, tp = confusion_matrix(labels, scores >= threshold, labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def prf(counts: dict[str, int]) -> dict[str, float]:
    """Precision, recall and F1 from `confusion`'s counts, 0 where undefined."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def choose_threshold(labels: np.ndarray, scores: np.ndarray, spec: EvaluateSpec) -> float | None:
    """The decision threshold by `evaluate.threshold`; None when the split cannot choose one.

    Candidates are the distinct scores; of equally good ones the highest wins (the fewest
    answers flagged).
    """
    if spec.threshold == "fixed":
        return float(spec.threshold_value)
    if labels.size == 0 or labels.min() == labels.max():
        return None
    # Every distinct score, high to low, after a first point at +inf that flags nothing.
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    if spec.threshold == "youden":
        gain = tpr - fpr
    else:
        n_pos = int(labels.sum())
        tps, fps = np.rint(tpr * n_pos), np.rint(fpr * (labels.size - n_pos))
        gain = 2 * tps / (tps + fps + n_pos)  # F1 = 2TP / (2TP + FP + FN)
    return float(thresholds[1:][int(np.argmax(gain[1:]))])


def score_metrics(rows: list[dict[str, Any]], name: str, spec: EvaluateSpec) -> dict[str, Any]:
    train, test = split_scores(rows, name, "train"), split_scores(rows, name, "test")
    both = test.labels.size > 0 and 0 < test.labels.sum() < test.labels.size
    threshold = choose_threshold(train.labels, train.values, spec)
    out: dict[str, Any] = {
        "kind": kind_of(name),
        "n_test": int(test.labels.size),
        "n_train": int(train.labels.size),
        "auroc": auroc(test.labels, test.values) if both else None,
        "ci95": bootstrap_ci(test.labels, test.values, spec.bootstrap, spec.seed) if both else None,
        "pr_auc": float(average_precision_score(test.labels, test.values)) if both else None,
        "threshold": threshold,
    }
    if threshold is not None and test.labels.size:
        counts = confusion(test.labels, test.values, threshold)
        out |= {"confusion": counts, **prf(counts)}
    else:
        out["note"] = (
            "the train split lacks one of the classes: no threshold could be chosen"
            if threshold is None
            else "no labelled test answers"
        )
    return out


def evaluate_detection(
    store: Store, run_id: str, spec: EvaluateSpec
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The detection section of report.json and its figures (ROC and PR curves, PNG)."""
    rows = load_rows(store, run_id)
    names = sorted(
        {n for row in rows for n in row["scores"]}, key=lambda n: (n != DETECTOR, kind_of(n), n)
    )
    described: dict[str, Any] = {}
    try:
        described = store.get_json(layout.detect_metrics_key(run_id)).get("scores", {})
    except (ArtifactNotFound, AttributeError):
        described = {}
    scores = {}
    for name in names:
        scores[name] = score_metrics(rows, name, spec)
        if isinstance(described.get(name), dict) and described[name].get("description"):
            scores[name]["description"] = described[name]["description"]
    counts = {
        split: {
            label: sum(1 for r in rows if r["split"] == split and r["label"] == label)
            for label in (POSITIVE, NEGATIVE, NO_ANSWER)
        }
        for split in ("train", "test")
    }
    section = {
        "positive_class": POSITIVE,
        "threshold_rule": spec.threshold,
        "threshold_chosen_on": "train",
        "metrics_on": "test",
        "ci_level": CI_LEVEL,
        "bootstrap": spec.bootstrap,
        "counts": counts,
        "no_answer_excluded": sum(c[NO_ANSWER] for c in counts.values()),
        "scores": scores,
    }
    plotted = [n for n in names if kind_of(n) != "signal"]
    figures = {
        "detection_roc": _curves_png(rows, plotted, "roc"),
        "detection_pr": _curves_png(rows, plotted, "pr"),
    }
    return section, figures


def _curves_png(rows: list[dict[str, Any]], names: list[str], which: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 4.2), dpi=100)
    for name in names:
        test = split_scores(rows, name, "test")
        if test.labels.size == 0 or test.labels.min() == test.labels.max():
            continue
        width, alpha = (2.4, 1.0) if name == DETECTOR else (1.2, 0.85)
        if which == "roc":
            x, y, _ = roc_curve(test.labels, test.values)
            label = f"{name} (AUROC {auroc(test.labels, test.values):.3f})"
            ax.plot(x, y, label=label, linewidth=width, alpha=alpha)
        else:
            y, x, _ = precision_recall_curve(test.labels, test.values)
            label = f"{name} (AP {average_precision_score(test.labels, test.values):.3f})"
            ax.step(x, y, where="post", label=label, linewidth=width, alpha=alpha)
    if which == "roc":
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right" if which == "roc" else "lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
