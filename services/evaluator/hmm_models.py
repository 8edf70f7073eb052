"""Fitting Gaussian HMMs with restarts, counting their parameters, storing them as tensors.

Models are stored as safetensors (float64, so a reloaded model decodes exactly the same
paths) with the covariance type and shape in the metadata: never pickled, as hmmlearn's
own persistence would.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from hmmlearn.hmm import GaussianHMM
from threadpoolctl import threadpool_limits

from services.evaluator.hmm_data import HMMError
from shared.spec import HMMSpec


def n_parameters(model: GaussianHMM) -> int:
    """Free parameters: start (k-1), transitions k(k-1), means kd, covariances by type.

    hmmlearn's own count, the one its `aic` and `bic` use, so the candidates' n_params
    and the quality check of parameters per observed value agree with their criteria.
    """
    return int(sum(model._get_n_fit_scalars_per_param().values()))


@contextlib.contextmanager
def _quiet_single_threaded() -> Iterator[None]:
    """One thread, no EM chatter.

    The k-means initialisation and the E-steps are tiny (hundreds of observations), so
    starting OpenMP/BLAS threads costs more than it saves: one thread is 4x faster on two
    busy cores. hmmlearn logs a warning per non-monotone EM step, noise across restarts.
    """
    logger = logging.getLogger("hmmlearn")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with threadpool_limits(1), np.errstate(all="ignore"):
            yield
    finally:
        logger.setLevel(level)


def fit_best(sequences: Sequence[np.ndarray], n_states: int, spec: HMMSpec) -> GaussianHMM:
    """The highest-likelihood fit of `spec.restarts` EM runs from different random starts."""
    x = np.concatenate(sequences)
    lengths = [len(s) for s in sequences]
    best: GaussianHMM | None = None
    best_score = -math.inf
    for restart in range(spec.restarts):
        seed = int(np.random.SeedSequence([spec.seed, n_states, restart]).generate_state(1)[0])
        model = GaussianHMM(
            n_components=n_states,
            covariance_type=spec.cov_type,
            n_iter=spec.n_iter,
            random_state=seed,
        )
        with _quiet_single_threaded():
            try:
                model.fit(x, lengths)
                score = float(model.score(x, lengths))
            except (ValueError, np.linalg.LinAlgError):
                continue  # a degenerate start; the other restarts still count
        if math.isfinite(score) and score > best_score:
            best, best_score = model, score
    if best is None:
        raise HMMError(
            f"hmm: every one of {spec.restarts} fits with {n_states} states failed on "
            f"{len(x)} observations; lower hmm.max_components or try hmm.cov_type: diag"
        )
    return best


def _stored_covariances(model: GaussianHMM) -> np.ndarray:
    """The covariances in hmmlearn's per-type shape (what the `covars_` setter takes).

    Read from `_covars_`: after a fit, hmmlearn 0.3 keeps spherical variances as [k, d]
    copies and its `covars_` property then returns k*d matrices instead of k.
    """
    stored = np.asarray(model._covars_, dtype=np.float64)
    if model.covariance_type == "spherical":
        return stored.reshape(model.n_components, -1)[:, 0].copy()
    return stored.copy()


def full_covariances(model: GaussianHMM) -> np.ndarray:
    """[k, d, d] covariance matrices whatever the covariance type."""
    stored, k, d = _stored_covariances(model), model.n_components, model.n_features
    if model.covariance_type == "diag":
        return np.stack([np.diag(row) for row in stored])
    if model.covariance_type == "spherical":
        return stored[:, None, None] * np.eye(d)[None]
    if model.covariance_type == "tied":
        return np.broadcast_to(stored, (k, d, d)).copy()
    return stored


def model_tensors(model: GaussianHMM) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a fitted model, for `Store.put_tensors`."""
    tensors = {
        "startprob": torch.from_numpy(np.asarray(model.startprob_, dtype=np.float64)),
        "transmat": torch.from_numpy(np.asarray(model.transmat_, dtype=np.float64)),
        "means": torch.from_numpy(np.asarray(model.means_, dtype=np.float64)),
        "covars": torch.from_numpy(_stored_covariances(model)),
    }
    metadata = {
        "format": "driftlab-gaussian-hmm-v1",
        "cov_type": model.covariance_type,
        "n_states": str(model.n_components),
        "n_features": str(model.n_features),
    }
    return tensors, metadata


def model_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> GaussianHMM:
    """The inverse of `model_tensors`: a model that decodes and scores like the saved one."""
    if metadata.get("format") != "driftlab-gaussian-hmm-v1":
        raise HMMError(
            f"hmm: not a driftlab HMM (format {metadata.get('format')!r}); "
            "rebuild it with `driftlab hmm`"
        )
    model = GaussianHMM(
        n_components=int(metadata["n_states"]), covariance_type=metadata["cov_type"]
    )
    model.n_features = int(metadata["n_features"])
    model.startprob_ = tensors["startprob"].numpy()
    model.transmat_ = tensors["transmat"].numpy()
    model.means_ = tensors["means"].numpy()
    model.covars_ = tensors["covars"].numpy()
    return model
