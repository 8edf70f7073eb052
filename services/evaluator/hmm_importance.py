"""Which features drive a state transition: the gradient of the filtered state posterior.

For a transition i -> j observed at time t, the importance of the features is

    d/dx_t log p(z_t = j | x_1..x_t)

as a vector over the d features, averaged over the transition's occurrences. Given the
observations before t, the filtered posterior is p(z_t=k | x_1..t) ∝ a_k * N(x_t; mu_k, S_k)
with a_k = p(z_t=k | x_1..t-1) not depending on x_t, so, with g_k(x) = -S_k^-1 (x - mu_k) the
gradient of log N(x; mu_k, S_k),

    d/dx_t log p(z_t=j | x_1..t) = g_j(x_t) - sum_k p(z_t=k | x_1..t) g_k(x_t).

This is exact (no autograd needed) and is one [T, k, d] array for a whole run. The reference
implementation sums over features before differentiating and so reports one scalar per
transition; here each feature keeps its own component. tests/stages/test_hmm.py checks it against
finite differences of hmmlearn's own forward-backward posteriors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from hmmlearn.hmm import GaussianHMM
from scipy.special import logsumexp

from services.evaluator.hmm_models import full_covariances

#: Features named beside each transition (graph labels, report tables).
TOP_FEATURES = 3
#: A gradient this small (z-score units) is numerically zero: it labels nothing.
NEGLIGIBLE_IMPORTANCE = 1e-9


def log_emissions(model: GaussianHMM, x: np.ndarray) -> np.ndarray:
    """log N(x_t; mu_k, S_k) as [T, k], from the model's full covariance matrices."""
    covars = full_covariances(model)
    out = np.empty((len(x), model.n_components))
    for k in range(model.n_components):
        chol = np.linalg.cholesky(covars[k])
        solved = np.linalg.solve(chol, (x - model.means_[k]).T)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        out[:, k] = -0.5 * ((solved**2).sum(axis=0) + log_det + x.shape[1] * np.log(2 * np.pi))
    return out


def filtered_log_posteriors(model: GaussianHMM, x: np.ndarray) -> np.ndarray:
    """log p(z_t = k | x_1..x_t) for every t, as [T, k] (the normalised forward pass)."""
    emissions = log_emissions(model, x)
    log_trans = np.log(np.maximum(model.transmat_, 1e-300))
    out = np.empty_like(emissions)
    prior = np.log(np.maximum(model.startprob_, 1e-300))
    for t in range(len(x)):
        joint = prior + emissions[t]
        out[t] = joint - logsumexp(joint)
        prior = logsumexp(out[t][:, None] + log_trans, axis=0)
    return out


def posterior_gradients(model: GaussianHMM, x: np.ndarray) -> np.ndarray:
    """d/dx_t log p(z_t = j | x_1..t) as [T, k, d]: entry [t, j] is the gradient vector."""
    precisions = np.linalg.inv(full_covariances(model))
    # g[t, k] = -P_k (x_t - mu_k)
    g = -np.einsum("kde,tke->tkd", precisions, x[:, None, :] - model.means_[None, :, :])
    post = np.exp(filtered_log_posteriors(model, x))
    return g - np.einsum("tk,tkd->td", post, g)[:, None, :]


@dataclass(frozen=True)
class Transition:
    """An observed change of decoded state, with its mean feature gradient."""

    source: int
    target: int
    count: int
    probability: float
    importance: dict[str, float]

    def top_features(self, count: int = TOP_FEATURES) -> list[tuple[str, float]]:
        """The features that most move the posterior; none whose gradient is numerically 0.

        A transition the model makes regardless of the observation (its posterior saturated)
        has gradients like 1e-241: labelling it with a feature would be noise.
        """
        ranked = sorted(self.importance.items(), key=lambda item: -abs(item[1]))
        return [(name, value) for name, value in ranked if abs(value) > NEGLIGIBLE_IMPORTANCE][
            :count
        ]

    def to_json(self) -> dict[str, object]:
        return {
            "from": self.source,
            "to": self.target,
            "count": self.count,
            "probability": self.probability,
            "top_features": [[name, value] for name, value in self.top_features()],
            "importance": self.importance,
        }


def observed_transitions(
    model: GaussianHMM,
    observations: Mapping[str, np.ndarray],
    states: Mapping[str, np.ndarray],
    features: Sequence[str],
) -> list[Transition]:
    """Every i -> j (i != j) seen in a decoded path, with its averaged gradient."""
    sums: dict[tuple[int, int], np.ndarray] = {}
    counts: dict[tuple[int, int], int] = {}
    for run_id, x in observations.items():
        path = states[run_id]
        changes = np.flatnonzero(path[1:] != path[:-1]) + 1
        if not len(changes):
            continue
        grads = posterior_gradients(model, x)
        for t in changes:
            edge = (int(path[t - 1]), int(path[t]))
            sums[edge] = sums.get(edge, 0.0) + grads[t, edge[1]]
            counts[edge] = counts.get(edge, 0) + 1
    return [
        Transition(
            source=i,
            target=j,
            count=counts[(i, j)],
            probability=float(model.transmat_[i, j]),
            importance={
                name: float(v)
                for name, v in zip(features, sums[(i, j)] / counts[(i, j)], strict=True)
            },
        )
        for i, j in sorted(sums)
    ]
