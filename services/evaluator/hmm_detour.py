"""Detour states: states some runs pass through and others skip, and what that costs.

Hu et al. (2023) call a state a detour when the runs that visit it converge later. Across
runs (seeds of a sweep) the test is the correlation between "run visited state s" (0/1)
and the run's convergence step: the point-biserial correlation, i.e. Pearson's r with a
binary variable, whose two-sided p-value comes from the t distribution with n - 2 degrees
of freedom (scipy.stats.pearsonr). A state every run visits, or none, has no such test and
is left out. It needs at least MIN_RUNS runs; with fewer the answer is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

MIN_RUNS = 5


def detour_analysis(
    states: Mapping[str, np.ndarray],
    n_states: int,
    convergence: Mapping[str, int],
    metric: str,
) -> dict[str, Any] | None:
    """Per state: who visits it, the correlation with the convergence step and its p-value."""
    run_ids = sorted(r for r in states if r in convergence)
    if len(run_ids) < MIN_RUNS:
        return None
    steps = np.array([convergence[r] for r in run_ids], dtype=np.float64)
    rows = []
    for state in range(n_states):
        visited = np.array([state in set(states[r].tolist()) for r in run_ids])
        if visited.all() or not visited.any():
            continue
        if np.ptp(steps) == 0:
            r_value, p_value = float("nan"), float("nan")
        else:
            result = stats.pearsonr(visited.astype(np.float64), steps)
            r_value, p_value = float(result.statistic), float(result.pvalue)
        rows.append(
            {
                "state": state,
                "visited_by": [r for r, v in zip(run_ids, visited, strict=True) if v],
                "correlation": None if np.isnan(r_value) else r_value,
                "p_value": None if np.isnan(p_value) else p_value,
                "mean_convergence_step_visited": float(steps[visited].mean()),
                "mean_convergence_step_not_visited": float(steps[~visited].mean()),
            }
        )
    return {
        "metric": metric,
        "convergence_steps": {r: int(convergence[r]) for r in run_ids},
        "states": rows,
    }
