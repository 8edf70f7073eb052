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


class ProbeContexts:
    """The probe's sequences as lists, read once, so each feature's contexts cost a sort.

    Ties are one example: tokens with the same token id and the same activation (to
    float16 precision) show the first of them with their number. Such tokens are the same
    example to the feature: the same question repeated in the probe (a causal model gives
    the same prefix the same activation), or, at the embeddings, the same token at the same
    position whatever precedes it (every answer's end-of-text token, say).
    """

    def __init__(self, probe: hidden.Probe) -> None:
        self.sequences = [
            row[:length]
            for row, length in zip(probe.input_ids.tolist(), probe.lengths.tolist(), strict=True)
        ]
        self.sample = probe.token_sample.tolist()
        self.position = probe.token_position.tolist()
        self.token_id = probe.token_id.numpy()
        self.example_ids = probe.example_ids
        #: Token ids the probe's texts use: what output-token rankings are drawn from.
        self.used_tokens = torch.unique(
            torch.cat([probe.input_ids[i, :n] for i, n in enumerate(probe.lengths.tolist())])
        )

    def top(
        self, column: torch.Tensor, decode: Callable[[list[int]], str], count: int, width: int
    ) -> list[dict[str, Any]]:
        """The `count` most activating distinct examples, `width` tokens of context each side."""
        values = column.double().numpy()
        active = np.flatnonzero(values > 0)
        active = active[np.argsort(-values[active], kind="stable")]
        keys = np.stack([self.token_id[active], values[active].astype(np.float16).view(np.int16)])
        _, first, sizes = np.unique(keys, axis=1, return_index=True, return_counts=True)
        shown = []
        for group in np.argsort(first, kind="stable")[:count].tolist():
            row = int(active[first[group]])
            ids, position = self.sequences[self.sample[row]], self.position[row]
            shown.append(
                {
                    "left": [decode([i]) for i in ids[max(0, position - width) : position]],
                    "token": decode([ids[position]]),
                    "right": [decode([i]) for i in ids[position + 1 : position + 1 + width]],
                    "activation": float(values[row]),
                    "count": int(sizes[group]),
                    "example": self.example_ids[self.sample[row]],
                }
            )
        return shown


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
    effects: torch.Tensor,
    decode: Callable[[list[int]], str],
    count: int,
    among: torch.Tensor | None = None,
) -> dict[str, list[list[Any]]]:
    """The `count` most promoted and most suppressed output tokens, as [text, effect].

    `among` restricts them to those token ids: a vocabulary the task never uses (the
    numbers tokenizer's 1,258 tokens for sums below 53) keeps its random initial
    unembedding rows, whose effects would crowd out the informative ones.
    """
    order = torch.argsort(effects, descending=True, stable=True)
    if among is not None:
        order = order[torch.isin(order, among)]
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
