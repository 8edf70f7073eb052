"""Do the three views of a training phase agree: HMM states, OT drift and eval accuracy?

Each source gives the steps at which it sees a phase boundary. They are compared on the
checkpoint axis, not in raw steps: checkpoints are what every source was measured at, and
"within k checkpoints" (`evaluate.phase_tolerance`) means the same thing whether a run
checkpoints every 10 steps or every 1000.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: An accuracy step counts as a jump when it is at least this share of the largest step...
JUMP_SHARE = 0.5
#: ...and at least this many accuracy points (so noise on a flat curve is no jump).
MIN_JUMP = 0.05
#: A logged training loss at least this many times the median of the LOSS_SPIKE_WINDOW
#: logged before it is a loss spike.
LOSS_SPIKE_RATIO = 10.0
LOSS_SPIKE_WINDOW = 5
#: Held-out accuracy whose first checkpoint dates a learnt task's transition (grokking's
#: jump from memorising the training pairs to answering the held-out ones).
CROSSING_ACCURACY = 0.5


def accuracy_jumps(steps: Sequence[int], accuracy: Sequence[float]) -> list[int]:
    """Checkpoints at which eval accuracy moves by a large share of its biggest move.

    Each interval is reported at its end (the first checkpoint showing the change), as the
    OT stage reports its intervals, so the two line up without an off-by-one.
    """
    if len(accuracy) < 2:
        return []
    change = np.abs(np.diff(np.asarray(accuracy, dtype=np.float64)))
    largest = float(change.max())
    if largest < MIN_JUMP:
        return []
    keep = np.flatnonzero(change >= max(JUMP_SHARE * largest, MIN_JUMP))
    return [int(steps[int(i) + 1]) for i in keep]


def loss_spikes(steps: Sequence[int], losses: Sequence[float]) -> list[dict[str, float]]:
    """Sudden rises of the training loss: a logged loss at least LOSS_SPIKE_RATIO times the
    median of the LOSS_SPIKE_WINDOW logged before it, the first of consecutive ones.

    Why look: under Adam a model that has fit its training set leaves it again in sudden
    loss spikes (the slingshot mechanism, Thilak et al. 2022), and grokking's jumps in
    held-out accuracy happen in them; the weights move far in one go, so the drift of the
    representations shows them too. A tenfold rise is far outside the step-to-step noise
    of a minibatch loss, so an ordinary run has none. A diverged loss (NaN, inf) is left
    out: the trainer's verdicts judge that, and it has no size to compare.
    """
    finite = [(s, x) for s, x in zip(steps, losses, strict=True) if math.isfinite(x)]
    steps, losses = [s for s, _ in finite], [x for _, x in finite]
    spikes: list[dict[str, float]] = []
    previous = -2
    for i in range(LOSS_SPIKE_WINDOW, len(losses)):
        before = float(np.median(losses[i - LOSS_SPIKE_WINDOW : i]))
        if losses[i] >= LOSS_SPIKE_RATIO * before and before > 0:
            if i != previous + 1:
                spikes.append({"step": int(steps[i]), "loss": float(losses[i]), "before": before})
            previous = i
    return spikes


def spike_checkpoints(checkpoints: Sequence[int], spike_steps: Sequence[int]) -> list[int]:
    """Each loss spike at the first checkpoint at or after it: the first whose weights
    carry it, as OT reports an interval at its end (spikes after the last are dropped)."""
    at = (bisect.bisect_left(checkpoints, step) for step in spike_steps)
    return sorted({int(checkpoints[i]) for i in at if i < len(checkpoints)})


def ot_change_points(phases: Mapping[str, Any]) -> list[int]:
    """Change points of the mean-over-layers drift curve of `ot/phases.json`."""
    if phases.get("depth_only"):
        return []
    mean = phases.get("curves", {}).get("mean", {})
    return sorted({int(item["step"]) for item in mean.get("change_points", [])})


def significant_ot_change_points(phases: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The OT change points that exceed their own curve's permutation baseline (large ones).

    Every curve of `ot/phases.json` is tested against its own baseline: each layer's and the
    mean over layers. The mean alone is not enough: its baseline is the mean of the layers'
    baselines, and a layer whose cloud holds few distinct points (the embeddings of a small
    vocabulary) has a large split-half baseline but little same-token drift, so it can
    hide a change that another layer shows far above its own. Each step comes once,
    with the curves that found it, sorted.
    """
    if phases.get("depth_only"):
        return []
    curves: dict[int, list[str]] = {}
    for name, curve in phases.get("curves", {}).items():
        for item in curve.get("change_points", []):
            if item.get("exceeds_baseline"):
                curves.setdefault(int(item["step"]), []).append(name)
    return [{"step": step, "curves": sorted(names)} for step, names in sorted(curves.items())]


def crossing_step(checkpoints: Sequence[int], accuracy: Sequence[float | None]) -> int | None:
    """The first checkpoint at which eval accuracy reaches CROSSING_ACCURACY, or None."""
    for step, value in zip(checkpoints, accuracy, strict=True):
        if value is not None and value >= CROSSING_ACCURACY:
            return int(step)
    return None


def nearest_boundary(
    checkpoints: Sequence[int], boundaries: Sequence[int] | None, step: int
) -> dict[str, Any] | None:
    """The boundary nearest to `step` and its signed offset in checkpoints (<0: earlier)."""
    if not boundaries:
        return None
    at = checkpoint_index(checkpoints, step)
    best = min(boundaries, key=lambda b: (abs(checkpoint_index(checkpoints, b) - at), b))
    return {"step": best, "offset_checkpoints": checkpoint_index(checkpoints, best) - at}


def crossing(
    checkpoints: Sequence[int],
    accuracy: Sequence[float | None],
    boundaries: Mapping[str, Sequence[int] | None],
) -> dict[str, Any]:
    """Where accuracy first reaches CROSSING_ACCURACY and each source's nearest boundary.

    Whether OT and the HMM see the transition the accuracy shows, as one offset per source
    (None: no crossing, or the source found no boundary or did not run).
    """
    step = crossing_step(checkpoints, accuracy)
    return {
        "accuracy": CROSSING_ACCURACY,
        "step": step,
        "nearest": {
            name: None if step is None else nearest_boundary(checkpoints, steps, step)
            for name, steps in boundaries.items()
        },
    }


def checkpoint_index(checkpoints: Sequence[int], step: int) -> int:
    """Index of the checkpoint nearest to `step` (ties to the earlier one)."""
    i = bisect.bisect_left(checkpoints, step)
    if i == 0:
        return 0
    if i == len(checkpoints):
        return len(checkpoints) - 1
    return i if checkpoints[i] - step < step - checkpoints[i - 1] else i - 1


def pair_agreement(
    checkpoints: Sequence[int], a: Sequence[int], b: Sequence[int], tolerance: int
) -> dict[str, Any]:
    """Which boundaries of `a` have one of `b` within `tolerance` checkpoints, and back.

    `agreement` is the share of all boundaries (of both) that found a partner: 1 when the
    two sources see the same phases, 0 when none line up, None when neither sees any.
    """
    ia = [checkpoint_index(checkpoints, s) for s in a]
    ib = [checkpoint_index(checkpoints, s) for s in b]
    matches = [
        {"a": sa, "b": sb, "offset_checkpoints": jb - ja}
        for (sa, ja), (sb, jb) in itertools.product(
            zip(a, ia, strict=True), zip(b, ib, strict=True)
        )
        if abs(jb - ja) <= tolerance
    ]
    a_hit = sum(1 for ja in ia if any(abs(jb - ja) <= tolerance for jb in ib))
    b_hit = sum(1 for jb in ib if any(abs(jb - ja) <= tolerance for ja in ia))
    total = len(a) + len(b)
    return {
        "n_a": len(a),
        "n_b": len(b),
        "a_matched": a_hit,
        "b_matched": b_hit,
        "agreement": (a_hit + b_hit) / total if total else None,
        "matches": matches,
    }


def phase_agreement(
    checkpoints: Sequence[int], sources: Mapping[str, Sequence[int] | None], tolerance: int
) -> dict[str, Any]:
    """Every source's boundaries and the agreement of each pair of available sources.

    A source that is None is absent (its stage did not run); it is listed as such and left
    out of the pairs, while a source that ran and found no boundary takes part.
    """
    present = {name: sorted(set(v)) for name, v in sources.items() if v is not None}
    pairs = [
        {"a": a, "b": b, **pair_agreement(checkpoints, present[a], present[b], tolerance)}
        for a, b in itertools.combinations(present, 2)
    ]
    return {
        "tolerance_checkpoints": tolerance,
        "checkpoints": list(checkpoints),
        "sources": present,
        "absent": sorted(name for name, v in sources.items() if v is None),
        "pairs": pairs,
    }
