"""Loss and accuracy of a run over steps, for colouring by HMM state and dating convergence.

The train loss comes from `train/metrics.jsonl`, eval loss and accuracy from each complete
checkpoint's `dynamics.json` (the trainer evaluates at every checkpoint). A run without
either simply has empty curves: the HMM itself only needs the dynamics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared import layout
from shared.steps import complete_steps, eval_metrics
from shared.store import Store

#: A run has converged once its metric has gone this share of the way from its first value
#: to its best one.
CONVERGED_SHARE = 0.9


@dataclass(frozen=True)
class Curve:
    name: str
    steps: np.ndarray
    values: np.ndarray
    higher_is_better: bool


def load_curves(store: Store, run_id: str) -> list[Curve]:
    """train_loss, eval_loss and eval_accuracy, whichever the run has (finite points only)."""
    points: dict[str, dict[int, float]] = {"train_loss": {}, "eval_loss": {}, "eval_accuracy": {}}
    for row in store.get_jsonl(layout.train_metrics_key(run_id), missing_ok=True):
        if isinstance(row.get("loss"), int | float) and "step" in row:
            points["train_loss"][int(row["step"])] = float(row["loss"])
    for step, evals in eval_metrics(store, run_id, complete_steps(store, run_id)).items():
        for name in ("eval_loss", "eval_accuracy"):
            if name in evals:
                points[name][step] = float(evals[name])
    curves = []
    for name, by_step in points.items():
        kept = sorted((s, v) for s, v in by_step.items() if math.isfinite(v))
        if kept:
            steps, values = zip(*kept, strict=True)
            curves.append(Curve(name, np.array(steps), np.array(values), name.endswith("accuracy")))
    return curves


def convergence_curve(curves: list[Curve]) -> Curve | None:
    """The curve convergence is dated by: eval accuracy, else eval loss, else train loss."""
    by_name = {c.name: c for c in curves if len(c.steps) >= 2}
    for name in ("eval_accuracy", "eval_loss", "train_loss"):
        if name in by_name:
            return by_name[name]
    return None


def convergence_step(curve: Curve) -> int:
    """First step at which the metric has gone CONVERGED_SHARE of the way to its best value.

    A run that never improves converged at its first step (nothing was left to learn).
    """
    sign = 1.0 if curve.higher_is_better else -1.0
    gain = sign * (curve.values - curve.values[0])
    reached = np.flatnonzero(gain >= CONVERGED_SHARE * gain.max())
    return int(curve.steps[reached[0]])
