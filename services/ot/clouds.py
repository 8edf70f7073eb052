"""The hidden-state clouds the OT stage compares, read through `shared.hidden` only.

Every cloud is the same `ot.n_points` probe tokens (one seeded draw for the whole run), so
a drift between two layers or two checkpoints is never a drift between different tokens.
PCA (`ot.pca_components`) must put both clouds of a pair in one basis or their distance
means nothing; see `project` for the bases used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shared import hidden
from shared.store import Store


@dataclass(frozen=True)
class HiddenClouds:
    """Subsampled residual-stream states of every layer at every extracted checkpoint."""

    steps: list[int]
    #: [T, L+1, n_points, d_model] float32, row i = probe token `token_index[i]`.
    states: Tensor
    token_index: Tensor
    #: [T, L+1, m, d_model]: up to n_points further probe tokens (`extra_index`), which
    #: with `states` form the pool the permutation baseline splits in two.
    extra: Tensor
    extra_index: Tensor

    @property
    def n_layers(self) -> int:
        """Hidden-state layers, embeddings included (L+1)."""
        return int(self.states.shape[1])


def load_clouds(
    store: Store, run_id: str, steps: list[int], n_points: int, seed: int
) -> HiddenClouds:
    """Read `n_points` seeded probe tokens of every layer of every checkpoint in `steps`.

    Up to `n_points` further tokens come along for the permutation baseline.
    All checkpoints must come from one probe set with one layer count and width; the
    first mismatch is reported naming both checkpoints.
    """
    probe = hidden.load_probe(store, run_id)
    first = hidden.load_index(store, run_id, steps[0])
    for step in steps:
        index = hidden.load_index(store, run_id, step)
        _check_same_extraction(run_id, probe, first, index)
    n_tokens = first.n_tokens
    order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))
    n = min(n_points, n_tokens)
    token_index = order[:n].sort().values
    extra_index = order[n : 2 * n].sort().values
    both = torch.cat([token_index, extra_index])
    states = torch.empty(len(steps), first.n_layers, len(both), first.d_model)
    for t, step in enumerate(steps):
        for layer in range(first.n_layers):
            states[t, layer] = hidden.load_hidden(store, run_id, step, layer)[both].float()
    return HiddenClouds(steps, states[:, :, :n], token_index, states[:, :, n:], extra_index)


def _check_same_extraction(
    run_id: str, probe: hidden.Probe, first: hidden.ExtractIndex, index: hidden.ExtractIndex
) -> None:
    where = f"run {run_id}: checkpoint step {index.step}"
    if index.probe_digest != probe.digest:
        raise hidden.ExtractionError(
            f"{where} was extracted with another probe set than extract/probe.safetensors: "
            f"rerun the extractor for step {index.step} with --force"
        )
    if index.n_tokens != probe.n_tokens:
        raise hidden.ExtractionError(
            f"{where} holds {index.n_tokens} tokens, the probe set {probe.n_tokens}: "
            f"rerun the extractor for step {index.step} with --force"
        )
    if (index.n_layers, index.d_model) != (first.n_layers, first.d_model):
        raise hidden.ExtractionError(
            f"{where} has {index.n_layers} layers of width {index.d_model}, step {first.step} "
            f"{first.n_layers} of width {first.d_model}: checkpoints of one run must share "
            "an architecture"
        )
    if index.n_tokens < 4:
        raise hidden.ExtractionError(
            f"{where} holds only {index.n_tokens} probe tokens; OT needs at least 4 "
            "(raise extract.probe_samples)"
        )


@dataclass(frozen=True)
class Basis:
    """A PCA basis (or the identity) fit on a group of clouds, applied to any of its points."""

    mean: Tensor
    components: Tensor | None
    explained: float

    def apply(self, x: Tensor) -> Tensor:
        centred = x - self.mean.to(x.dtype)
        return centred if self.components is None else centred @ self.components.to(x.dtype)


def fit_basis(clouds: Tensor, components: int | None) -> Basis:
    """Top principal components of a group of clouds [G, n, d] pooled.

    One basis per group is what makes the group's clouds commensurable: the stage fits one
    on all layers of one checkpoint (for `depth`) and one on all checkpoints of one layer
    (for `time` and `step`). Points are centred on the pooled mean, which OT's translation
    invariance makes harmless. `explained` is the fraction of the pooled variance kept
    (1.0 when `components` is None or not below the width: no projection).
    """
    d = clouds.shape[-1]
    pooled = clouds.reshape(-1, d).to(torch.float64)
    mean = pooled.mean(0)
    if components is None or components >= d:
        return Basis(mean, None, 1.0)
    centred = pooled - mean
    cov = centred.T @ centred / max(1, pooled.shape[0] - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    total = float(eigvals.clamp_min(0).sum())
    kept = float(eigvals[-components:].clamp_min(0).sum()) / total if total > 0 else 1.0
    return Basis(mean, eigvecs[:, -components:].flip(1), kept)
