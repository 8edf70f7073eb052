"""The numbers of one SAE feature's card in the explorer, each a small pure function.

Neuronpedia and SAEDashboard show the same kinds of facts per feature; these are written
for driftlab's store (probe tokens, one SAE per layer) and tested against direct
computations (tests/unit/test_explorer_features.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from shared import hidden

HISTOGRAM_BINS = 20


def density(column: torch.Tensor) -> float:
    """The share of probe tokens on which the feature fires (activation > 0)."""
    return float((column > 0).float().mean()) if column.numel() else 0.0


def activation_histogram(column: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts of the feature's non-zero activations in `bins` equal bins from 0 to its max.

    Zeros are left out (they are the 1 - density share): with them, every sparse feature's
    histogram would be one tall bar at 0.
    """
    active = column[column > 0].double().numpy()
    top = float(active.max()) if active.size else 0.0
    counts, _ = np.histogram(active, bins=bins, range=(0.0, top or 1.0))
    return {"max": top, "counts": counts.tolist(), "active": int(active.size)}


def top_contexts(
    column: torch.Tensor,
    probe: hidden.Probe,
    decode: Callable[[list[int]], str],
    count: int,
    width: int,
) -> list[dict[str, Any]]:
    """The `count` most activating probe tokens, with `width` tokens of context each side.

    The model is causal, so a token with the same preceding tokens has the same activation:
    such repeats (the same question asked by several probe samples) are one example, with
    how often it occurs, instead of `count` copies of one context.
    """
    order = torch.argsort(column, descending=True, stable=True).tolist()
    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    for row in order:
        value = float(column[row])
        if value <= 0:
            break
        sample, position = int(probe.token_sample[row]), int(probe.token_position[row])
        ids = [int(i) for i in probe.input_ids[sample, : int(probe.lengths[sample])]]
        prefix = tuple(ids[: position + 1])
        if prefix in seen:
            seen[prefix]["count"] += 1
            continue
        if len(seen) == count:
            continue  # still counting repeats of the examples already kept
        seen[prefix] = {
            "left": [decode([i]) for i in ids[max(0, position - width) : position]],
            "token": decode([ids[position]]),
            "right": [decode([i]) for i in ids[position + 1 : position + 1 + width]],
            "activation": value,
            "count": 1,
            "example": probe.example_ids[sample],
        }
    return list(seen.values())


def logit_effects(
    direction: torch.Tensor, unembedding: torch.Tensor, ln_scale: torch.Tensor | None
) -> torch.Tensor:
    """The feature's direct effect on every output logit, per unit of activation.

    `direction` is the feature's decoder row in residual units, `unembedding` the
    [vocab, d_model] output matrix. The final layer norm subtracts the mean and multiplies
    by its scale before the unembedding; both are applied. Its division by the token's
    standard deviation is one positive number per token: it changes no ranking and is left
    out, so the values are relative.
    """
    centred = direction.double() - direction.double().mean()
    if ln_scale is not None:
        centred = centred * ln_scale.double()
    return unembedding.double() @ centred


def ranked_tokens(
    effects: torch.Tensor, decode: Callable[[list[int]], str], count: int
) -> dict[str, list[list[Any]]]:
    """The `count` most promoted and most suppressed output tokens, as [text, effect]."""
    order = torch.argsort(effects, descending=True, stable=True)
    return {
        "promoted": [[decode([int(i)]), float(effects[i])] for i in order[:count]],
        "suppressed": [[decode([int(i)]), float(effects[i])] for i in order.flip(0)[:count]],
    }


def nearest_features(
    decoder: torch.Tensor, chosen: list[int], other: torch.Tensor, count: int
) -> dict[int, list[list[float]]]:
    """For each chosen feature, the `count` features of `other` whose decoder directions
    have the largest cosine with its own, as [feature, cosine]."""
    a = torch.nn.functional.normalize(decoder[chosen].double(), dim=1)
    b = torch.nn.functional.normalize(other.double(), dim=1)
    cosines = a @ b.T
    values, index = cosines.topk(min(count, b.shape[0]), dim=1)
    return {
        feature: [[int(j), float(v)] for j, v in zip(index[n], values[n], strict=True)]
        for n, feature in enumerate(chosen)
    }
