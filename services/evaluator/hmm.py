"""Latent phases of training: Gaussian HMMs on training-dynamics features (Hu et al. 2023).

`run_hmm` follows the reference procedure, with its rough edges fixed:

1. Each run's dynamics (hmm.features) are z-scored within the run (hmm_data).
2. For 1..hmm.max_components states, hmm.restarts EM fits each on the fitted part of a
   held-out split (whole runs with 5 or more runs, else a split in time; hmm_data); each
   candidate gets its fitted and held-out log-likelihood and AIC/BIC with the parameter
   count of its covariance type (hmm_models).
3. The number of states is picked by hmm.select_by (lowest BIC/AIC, or highest held-out
   log-likelihood; ties go to fewer states), then a model of that size is refitted on every
   observation: the split is for choosing, and with a split in time a phase that only
   appears at the end of training would otherwise have no state.
4. States are renumbered by when they occur (state 0 is the earliest on average), so the
   labels read as phases; each run's Viterbi path is decoded.
5. Each observed transition i -> j gets the gradient of log p(state j | observations so far)
   with respect to the observation, per feature (hmm_importance), and, with 5 or more runs,
   the detour-state test against the step each run converged at (hmm_detour).

`hmm_store.save_hmm` writes every model (safetensors), the analysis (JSON), the state graph
(SVG) and the state-coloured curves (PNG) under `evaluate/hmm/` of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hmmlearn.hmm import GaussianHMM

from services.evaluator.hmm_curves import convergence_curve, convergence_step, load_curves
from services.evaluator.hmm_data import (
    HeldOutSplit,
    HMMError,
    RunObservations,
    choose_split,
    load_run_observations,
)
from services.evaluator.hmm_detour import MIN_RUNS, detour_analysis
from services.evaluator.hmm_importance import Transition, observed_transitions
from services.evaluator.hmm_models import (
    fit_best,
    model_from_tensors,
    model_tensors,
    n_parameters,
)
from shared import layout
from shared.spec import HMMSpec
from shared.store import Store

__all__ = ["ANALYSIS_NAME", "CURVES_NAME", "GRAPH_NAME", "MODEL_NAME", "HMMAnalysis", "run_hmm"]

ANALYSIS_NAME = "analysis.json"
MODEL_NAME = "model.safetensors"
GRAPH_NAME = "states.svg"
CURVES_NAME = "curves.png"


def candidate_model_name(n_states: int) -> str:
    return f"model-k{n_states}.safetensors"


@dataclass(frozen=True)
class Candidate:
    """One number of states, fitted on the split's fitted part."""

    n_states: int
    model: GaussianHMM
    n_params: int
    loglik_train: float
    loglik_heldout: float
    aic: float
    bic: float
    #: Fewer free parameters than the scalar values it was fitted to; only these are chosen.
    identifiable: bool

    def criterion(self, select_by: str) -> float:
        """Lower is better, whatever the criterion."""
        return {"bic": self.bic, "aic": self.aic, "loglik": -self.loglik_heldout}[select_by]

    def to_json(self) -> dict[str, Any]:
        return {
            "n_states": self.n_states,
            "n_params": self.n_params,
            "loglik_train": self.loglik_train,
            "loglik_heldout": self.loglik_heldout,
            "aic": self.aic,
            "bic": self.bic,
            "identifiable": self.identifiable,
            "model": candidate_model_name(self.n_states),
        }


@dataclass
class HMMAnalysis:
    """Everything `run_hmm` found; `to_json` is what reports and tools read."""

    spec: HMMSpec
    runs: list[RunObservations]
    split: HeldOutSplit
    candidates: list[Candidate]
    model: GaussianHMM
    loglik: float
    states: dict[str, np.ndarray]
    transitions: list[Transition]
    detour: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def n_states(self) -> int:
        return int(self.model.n_components)

    @property
    def features(self) -> list[str]:
        return list(self.spec.features)

    def state_changes(self) -> dict[str, list[int]]:
        """Per run, the steps at which the decoded state differs from the one before."""
        out = {}
        for run in self.runs:
            path = self.states[run.run_id]
            out[run.run_id] = [int(s) for s in run.steps[1:][path[1:] != path[:-1]]]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "n_states": self.n_states,
            "selected_by": self.spec.select_by,
            "cov_type": self.spec.cov_type,
            "features": self.features,
            "split": self.split.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
            "model": MODEL_NAME,
            "loglik": self.loglik,
            "startprob": self.model.startprob_.tolist(),
            "transmat": self.model.transmat_.tolist(),
            "means": self.model.means_.tolist(),
            "runs": {
                run.run_id: {
                    "steps": run.steps.tolist(),
                    "states": self.states[run.run_id].tolist(),
                    "zscore": {"mean": run.mean.tolist(), "std": run.std.tolist()},
                }
                for run in self.runs
            },
            "state_changes": self.state_changes(),
            "transitions": [t.to_json() for t in self.transitions],
            "detour": self.detour,
            "notes": self.notes,
        }


def _heldout_loglik(
    model: GaussianHMM, split: HeldOutSplit, runs: Sequence[RunObservations]
) -> float:
    if split.kind == "runs":
        held = [r.z for r in runs if r.run_id in split.heldout_runs]
        return float(model.score(np.concatenate(held), [len(z) for z in held]))
    total = 0.0
    for run in runs:
        head = split.head_length(len(run))
        total += float(model.score(run.z)) - float(model.score(run.z[:head]))
    return total


def _fit_candidates(
    runs: Sequence[RunObservations], split: HeldOutSplit, spec: HMMSpec
) -> list[Candidate]:
    train = split.train_sequences(runs)
    x, lengths = np.concatenate(train), [len(z) for z in train]
    if len(x) < spec.max_components:
        raise HMMError(
            f"hmm: {len(x)} observations to fit ({split.describe()}) are fewer than "
            f"hmm.max_components={spec.max_components} states; lower hmm.max_components or "
            "record dynamics more often (train.dynamics_every) or over more runs"
        )
    candidates = []
    for k in range(1, spec.max_components + 1):
        model = fit_best(train, k, spec)
        loglik = float(model.score(x, lengths))
        n_params = n_parameters(model)
        aic, bic = float(model.aic(x, lengths)), float(model.bic(x, lengths))
        heldout = _heldout_loglik(model, split, runs)
        candidates.append(
            Candidate(k, model, n_params, loglik, heldout, aic, bic, n_params < x.size)
        )
    return candidates


def _permuted(model: GaussianHMM, order: np.ndarray) -> GaussianHMM:
    """The same model with state `order[i]` renamed i."""
    tensors, metadata = model_tensors(model)
    tensors["startprob"] = tensors["startprob"][order]
    tensors["transmat"] = tensors["transmat"][order][:, order]
    tensors["means"] = tensors["means"][order]
    if model.covariance_type != "tied":
        tensors["covars"] = tensors["covars"][order]
    return model_from_tensors(tensors, metadata)


def _ordered_by_time(model: GaussianHMM, runs: Sequence[RunObservations]) -> GaussianHMM:
    """Renumber states by their mean relative time in the decoded paths (unused ones last)."""
    k = model.n_components
    total, count = np.zeros(k), np.zeros(k)
    for run in runs:
        path = model.predict(run.z)
        np.add.at(total, path, np.linspace(0.0, 1.0, len(path)))
        np.add.at(count, path, 1)
    mean_time = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    return _permuted(model, np.argsort(mean_time, kind="stable"))


def _detour(
    store: Store, states: dict[str, np.ndarray], n_states: int, notes: list[str]
) -> dict[str, Any] | None:
    if len(states) < MIN_RUNS:
        notes.append(f"detour-state analysis needs {MIN_RUNS} or more runs; got {len(states)}")
        return None
    convergence: dict[str, int] = {}
    metric = None
    for run_id in states:
        curve = convergence_curve(load_curves(store, run_id))
        if curve is None:
            notes.append(f"run {run_id} has no loss or accuracy curve; left out of the detours")
            continue
        if metric is not None and curve.name != metric:
            notes.append(f"run {run_id} converged by {curve.name}, not {metric}; left out")
            continue
        metric = curve.name
        convergence[run_id] = convergence_step(curve)
    result = detour_analysis(states, n_states, convergence, metric or "none")
    if result is None:
        notes.append(f"detour-state analysis needs {MIN_RUNS} runs with curves")
    return result


def run_hmm(store: Store, run_ids: list[str], spec: HMMSpec) -> HMMAnalysis:
    """Fit, select, decode and explain an HMM of the runs' training dynamics."""
    if not run_ids:
        raise HMMError("hmm: no runs given; pass --runs RUN_ID ... or --sweep NAME")
    if len(set(run_ids)) != len(run_ids):
        raise HMMError(f"hmm: a run is listed twice in {run_ids}")
    runs = [load_run_observations(store, layout.validate_run_id(r), spec.features) for r in run_ids]
    split = choose_split(run_ids, spec.seed)
    candidates = _fit_candidates(runs, split, spec)
    # A model with as many free parameters as observed values fits anything: choosing it
    # would report states that are noise. With none identifiable, the smallest is kept and
    # the evaluator's quality check fails.
    eligible = [c for c in candidates if c.identifiable] or candidates[:1]
    chosen = min(eligible, key=lambda c: c.criterion(spec.select_by))
    model = _ordered_by_time(fit_best([r.z for r in runs], chosen.n_states, spec), runs)
    loglik = float(model.score(np.concatenate([r.z for r in runs]), [len(r) for r in runs]))
    states = {r.run_id: model.predict(r.z) for r in runs}
    transitions = observed_transitions(model, {r.run_id: r.z for r in runs}, states, spec.features)
    notes: list[str] = []
    detour = _detour(store, states, model.n_components, notes)
    return HMMAnalysis(
        spec, runs, split, candidates, model, loglik, states, transitions, detour, notes
    )
