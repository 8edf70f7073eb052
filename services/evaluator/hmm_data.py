"""What the training-dynamics HMM observes, and how its held-out data is chosen.

Each run's `train/dynamics.jsonl` (one row per `train.dynamics_every` steps, written by the
trainer) becomes a [T, d] matrix of the chosen features, z-scored within the run: runs of
different seeds or widths sit at different weight scales, and the HMM should model how the
features move, not where each run happens to start (Hu et al. 2023 do the same).

Held-out log-likelihood needs data the fit did not see:

- 5 or more runs: whole runs are held out (20%, at least one, drawn with the HMM seed), so
  the score asks "does this model explain a new seed?".
- fewer runs: a split in time. The first 80% of each run (at least one observation) is
  fitted and the held-out score is log p(tail | head) = log p(run) - log p(head): the
  probability of the unseen end of each run given its beginning, which is what an HMM
  forecasting the rest of training would be judged on. Scoring the tail as a sequence of
  its own would charge it for starting in the initial state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shared import layout, stage_registry
from shared.errors import ArtifactNotFound, DriftlabError, InputMissing, JsonLinesError
from shared.store import Store

HELDOUT_FRACTION = 0.2
#: Runs needed before whole runs are held out instead of the end of each run.
MIN_RUNS_FOR_RUN_SPLIT = 5


class HMMError(DriftlabError):
    """The HMM cannot be fitted to these runs (too little data, unusable features)."""

    exit_code = 2


@dataclass(frozen=True)
class RunObservations:
    """One run's dynamics: the steps, the raw features and their within-run scaling."""

    run_id: str
    steps: np.ndarray
    raw: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @property
    def z(self) -> np.ndarray:
        return (self.raw - self.mean) / self.std

    def __len__(self) -> int:
        return len(self.steps)


def zscore_params(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation; a constant feature gets std 1 (all zeros)."""
    mean = raw.mean(axis=0)
    std = raw.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def load_run_observations(store: Store, run_id: str, features: Sequence[str]) -> RunObservations:
    """Read a run's dynamics rows; rows with a non-finite feature (divergence) are dropped."""
    key = layout.train_dynamics_key(run_id)

    def not_a_dynamics_row(number: int) -> HMMError:
        return HMMError(
            f"hmm: line {number} of {store.url_of(key)} is not a dynamics row with a step; "
            f"rewrite it: `{stage_registry.TRAIN.command(run_id, store.url)} --force`"
        )

    try:
        lines = store.get_jsonl_lines(key)
    except ArtifactNotFound:
        raise InputMissing(
            f"hmm: run {run_id} has no training dynamics at {store.url_of(key)}; run "
            f"`{stage_registry.TRAIN.command(run_id, store.url)}` first"
        ) from None
    except JsonLinesError as err:
        raise not_a_dynamics_row(err.line_number) from None
    by_step: dict[int, list[float]] = {}
    for number, row in lines:
        try:
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            raise not_a_dynamics_row(number) from None
        missing = [name for name in features if name not in row]
        if missing:
            raise HMMError(
                f"hmm: {store.url_of(key)} has no {', '.join(missing)} (step {step}); "
                "choose hmm.features among the columns the trainer wrote"
            )
        values = [float(row[name]) if row[name] is not None else math.nan for name in features]
        by_step[step] = values  # a resumed run may repeat a step: the last row wins
    steps = np.array(sorted(by_step), dtype=np.int64)
    raw = np.array([by_step[int(s)] for s in steps], dtype=np.float64).reshape(
        len(steps), len(features)
    )
    finite = np.isfinite(raw).all(axis=1)
    steps, raw = steps[finite], raw[finite]
    if len(steps) < 2:
        raise HMMError(
            f"hmm: run {run_id} has {len(steps)} usable dynamics rows in {store.url_of(key)}; "
            "an HMM needs at least 2: train longer or lower train.dynamics_every"
        )
    mean, std = zscore_params(raw)
    return RunObservations(run_id, steps, raw, mean, std)


@dataclass(frozen=True)
class HeldOutSplit:
    """Which observations are fitted and which are scored as held-out (module docstring)."""

    kind: Literal["runs", "time"]
    heldout_runs: tuple[str, ...] = ()
    train_fraction: float = 1.0 - HELDOUT_FRACTION

    def head_length(self, length: int) -> int:
        """Fitted prefix of a run of `length` observations under a split in time."""
        return min(length - 1, max(1, round(self.train_fraction * length)))

    def train_sequences(self, runs: Sequence[RunObservations]) -> list[np.ndarray]:
        if self.kind == "runs":
            return [r.z for r in runs if r.run_id not in self.heldout_runs]
        return [r.z[: self.head_length(len(r))] for r in runs]

    def describe(self) -> str:
        if self.kind == "runs":
            return (
                f"{len(self.heldout_runs)} whole run(s) held out "
                f"({', '.join(self.heldout_runs)}); the others fitted"
            )
        return (
            f"split in time: the first {self.train_fraction:.0%} of each run fitted, the "
            "held-out score is log p(rest | first part)"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "heldout_runs": list(self.heldout_runs),
            "train_fraction": self.train_fraction,
            "description": self.describe(),
        }


def choose_split(run_ids: Sequence[str], seed: int) -> HeldOutSplit:
    """Runs split 80/20 when there are enough runs, else a split in time (docstring)."""
    if len(run_ids) < MIN_RUNS_FOR_RUN_SPLIT:
        return HeldOutSplit("time")
    ordered = sorted(run_ids)
    count = max(1, round(HELDOUT_FRACTION * len(ordered)))
    picked = np.random.default_rng(seed).permutation(len(ordered))[:count]
    return HeldOutSplit("runs", tuple(sorted(ordered[i] for i in picked)))
