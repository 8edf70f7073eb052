"""Phase transitions in step-drift curves, and how they line up with eval metrics.

A step-drift curve has one value per interval between consecutive checkpoints; interval i
runs from checkpoint `steps[i]` to `steps[i + 1]` and is reported at its end, `steps[i + 1]`,
the first checkpoint at which the change is visible. Two detectors read each curve:

* **Change points** (`ruptures` PELT, l2 cost, minimum segment of one interval): where the
  level of drift changes. The curve is first divided by its noise sigma, estimated robustly
  from first differences (1.4826 MAD / sqrt 2), so the penalty is in units of noise
  variance: `ot.change_penalty`, or by default 2 ln(n), the BIC of a mean shift (one new
  mean and one location per change) for n intervals.
* **Spikes** (robust MAD test): intervals whose modified z-score
  0.6745 (x - median) / MAD exceeds 3.5 (Iglewicz and Hoaglin), one-sided: bursts of drift.

Both noise estimates are floored at 10% of the curve's median: a flat stretch of drift
varies by a few percent, which with few intervals makes a tiny sigma, and PELT would cut
those real but irrelevant wiggles into segments. A phase is a change of the drift rate by
more than that.

A *transition* is an episode of rising drift: consecutive intervals that are spikes or
start a higher level (a rising change point), reported at its first interval (`step`) with
its peak; `magnitude` is the peak drift minus the curve's median. Each item says whether
the drift exceeds the permutation baseline (see `services.ot.drift`): whether the change
is as large as the difference between two token samples of one checkpoint. Step drift
compares the same tokens, so a change can be far smaller than that and still be certain;
a transition therefore also says whether it stands clear of its curve's typical level
under token resampling (`clears_background`: the peak's lower bootstrap bound above the
median of the curve's upper bounds), which tells a burst of drift from sampling noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPIKE_Z = 3.5
#: Noise sigma is never taken below this fraction of a curve's median (see module docstring).
REL_NOISE_FLOOR = 0.1
#: Curves shorter than this have no change-point or spike analysis (too few intervals).
MIN_INTERVALS = 3
_MAD_TO_SIGMA = 1.4826


def default_penalty(n_intervals: int) -> float:
    """BIC of a mean shift on a unit-noise curve: 2 ln(n)."""
    return 2.0 * math.log(max(n_intervals, 2))


def _floor(values: np.ndarray) -> float:
    """Smallest noise sigma a curve is given: REL_NOISE_FLOOR of its median magnitude."""
    return max(REL_NOISE_FLOOR * abs(float(np.median(values))), 1e-12)


def _noise_sigma(values: np.ndarray) -> float:
    """Noise sigma from first differences (robust to level shifts and single spikes)."""
    diffs = np.diff(values)
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2)
    return max(sigma, _floor(values))


def change_points(values: np.ndarray, penalty: float | None) -> list[int]:
    """Interval indices where a new level begins (PELT on the noise-standardised curve)."""
    import ruptures

    if len(values) < MIN_INTERVALS:
        return []
    signal = (values / _noise_sigma(values)).reshape(-1, 1)
    pen = default_penalty(len(values)) if penalty is None else penalty
    ends = ruptures.Pelt(model="l2", min_size=1, jump=1).fit(signal).predict(pen=pen)
    return [int(b) for b in ends[:-1]]


def spike_scores(values: np.ndarray) -> np.ndarray:
    """Modified z-score of each interval; large positive values are drift bursts."""
    median = float(np.median(values))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    return (values - median) / max(sigma, _floor(values))


def _exceeds(value: float, baseline: np.ndarray | None, *intervals: int) -> bool | None:
    if baseline is None:
        return None
    return bool(value > max(float(baseline[i]) for i in intervals))


def analyse_curve(
    steps: Sequence[int],
    values: np.ndarray,
    *,
    baseline: np.ndarray | None,
    ci: np.ndarray | None,
    p_values: np.ndarray | None,
    penalty: float | None,
) -> dict[str, Any]:
    """Change points, spikes and transitions of one step-drift curve (see module docstring)."""

    def interval(i: int) -> list[int]:
        return [int(steps[i]), int(steps[i + 1])]

    segments = [0, *change_points(values, penalty), len(values)]
    means = [float(values[a:b].mean()) for a, b in itertools.pairwise(segments)]
    cps: list[dict[str, Any]] = []
    for k, b in enumerate(segments[1:-1]):
        before, after = means[k], means[k + 1]
        cps.append(
            {
                "step": int(steps[b + 1]),
                "interval": interval(b),
                "before": before,
                "after": after,
                "magnitude": after - before,
                "exceeds_baseline": _exceeds(abs(after - before), baseline, b - 1, b),
            }
        )
    spikes, spike_at = [], []
    if len(values) >= MIN_INTERVALS:
        z = spike_scores(values)
        spike_at = [int(i) for i in np.flatnonzero(z > SPIKE_Z)]
        spikes = [
            {
                "step": int(steps[i + 1]),
                "interval": interval(i),
                "value": float(values[i]),
                "z": float(z[i]),
                "exceeds_baseline": _exceeds(float(values[i]), baseline, i),
            }
            for i in spike_at
        ]
    flagged: dict[int, set[str]] = {}
    for b, cp in zip(segments[1:-1], cps, strict=True):
        if cp["magnitude"] > 0:
            flagged.setdefault(b, set()).add("pelt")
    for i in spike_at:
        flagged.setdefault(i, set()).add("mad")
    transitions = [
        _transition(steps, values, baseline, ci, episode, flagged)
        for episode in _runs(sorted(flagged))
    ]
    return {
        "values": values.tolist(),
        "ci": None if ci is None else ci.tolist(),
        "baseline": None if baseline is None else baseline.tolist(),
        "p_values": None if p_values is None else p_values.tolist(),
        "change_points": cps,
        "spikes": spikes,
        "transitions": transitions,
    }


def _runs(indices: list[int]) -> list[list[int]]:
    """Consecutive indices grouped: [1, 2, 5] -> [[1, 2], [5]]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _transition(
    steps: Sequence[int],
    values: np.ndarray,
    baseline: np.ndarray | None,
    ci: np.ndarray | None,
    episode: list[int],
    flagged: Mapping[int, set[str]],
) -> dict[str, Any]:
    """One episode of rising drift: consecutive flagged intervals, reported at its start."""
    peak = max(episode, key=lambda i: float(values[i]))
    clears = None if ci is None else bool(ci[0][peak] > float(np.median(ci[1])))
    return {
        "step": int(steps[episode[0] + 1]),
        "interval": [int(steps[episode[0]]), int(steps[episode[-1] + 1])],
        "peak_step": int(steps[peak + 1]),
        "drift": float(values[peak]),
        "magnitude": float(values[peak] - np.median(values)),
        "by": sorted(set().union(*(flagged[i] for i in episode))),
        "exceeds_baseline": _exceeds(float(values[peak]), baseline, peak),
        "clears_background": clears,
    }


def eval_jumps(steps: Sequence[int], values: Sequence[float | None]) -> list[dict[str, Any]]:
    """Intervals where an eval metric moves unusually far (MAD test on its changes)."""
    if any(v is None for v in values) or len(values) < MIN_INTERVALS + 1:
        return []
    series = np.asarray(values, dtype=np.float64)
    change = np.diff(series)
    z = spike_scores(np.abs(change))
    return [
        {
            "step": int(steps[i + 1]),
            "interval": [int(steps[i]), int(steps[i + 1])],
            "change": float(change[i]),
            "z": float(z[i]),
        }
        for i in (int(k) for k in np.flatnonzero(z > SPIKE_Z))
    ]


def lead_lag(
    drift: np.ndarray, metric: Sequence[float | None], max_lag: int = 3
) -> dict[str, Any] | None:
    """Lag (in checkpoint intervals) at which |change of the metric| follows drift best.

    Correlates the step-drift curve with the absolute change of the metric per interval,
    shifted by k intervals: k > 0 means the metric moves k intervals after the
    representations do (drift leads), k < 0 that it moved first (drift lags).
    """
    if any(v is None for v in metric):
        return None
    change = np.abs(np.diff(np.asarray(metric, dtype=np.float64)))
    n = len(drift)
    best: tuple[float, int] | None = None
    for k in range(-min(max_lag, n - 3), min(max_lag, n - 3) + 1):
        a = drift[max(0, -k) : n - max(0, k)]
        b = change[max(0, k) : n - max(0, -k)]
        if len(a) < 3 or a.std() == 0 or b.std() == 0:
            continue
        r = float(np.corrcoef(a, b)[0, 1])
        if best is None or r > best[0] + 1e-12:
            best = (r, k)
    if best is None:
        return None
    r, k = best
    reading = (
        "drift and the metric change in the same interval"
        if k == 0
        else f"drift {'leads' if k > 0 else 'lags'} the metric by {abs(k)} checkpoint interval"
        + ("s" if abs(k) > 1 else "")
    )
    return {"lag_intervals": k, "correlation": r, "reading": reading}


def align(
    steps: Sequence[int],
    transitions: Sequence[Mapping[str, Any]],
    jumps: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """For each drift transition, the nearest jump of each eval metric and the lag in steps."""
    out = []
    for tr in transitions:
        for name, metric_jumps in jumps.items():
            if not metric_jumps:
                continue
            nearest = min(metric_jumps, key=lambda j: (abs(j["step"] - tr["step"]), j["step"]))
            lag = int(nearest["step"]) - int(tr["step"])
            reading = (
                "at the same checkpoint"
                if lag == 0
                else f"drift {'leads' if lag > 0 else 'lags'} by {abs(lag)} steps"
            )
            out.append(
                {
                    "drift_step": tr["step"],
                    "metric": name,
                    "metric_step": nearest["step"],
                    "lag_steps": lag,
                    "reading": reading,
                }
            )
    return out
