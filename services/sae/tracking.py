"""Hypothesis tracking: which SAE features compete while an answer is written.

At each generated token (step) and each tracked layer, the active features with the
largest activations are that step's *hypotheses*. They are linked

- across steps when the same feature stays active: a run of consecutive steps is a
  *track* (birth, death, length, mass = summed activation);
- across adjacent tracked layers when their decoder directions are aligned (cosine at or
  above `detect.link_cosine`). The residual stream is one vector space shared by every
  layer, so two SAEs' decoder rows can be compared directly: aligned rows write the same
  direction, which is what "the same hypothesis carried to the next layer" means. This
  needs no data beyond the SAEs themselves, unlike co-activation on the probe set, whose
  estimates for rarely firing features would rest on a handful of tokens.

Everything here is plain Python over small per-answer structures, so it is tested on
hand-made activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise

import torch

#: feature -> activation of one step's hypotheses at one layer.
Step = dict[int, float]


@dataclass(frozen=True)
class Track:
    """One feature active at one layer over consecutive steps birth..death (inclusive)."""

    layer: int
    feature: int
    birth: int
    death: int
    mass: float

    @property
    def length(self) -> int:
        return self.death - self.birth + 1


@dataclass(frozen=True)
class Link:
    """Features of two adjacent tracked layers, active at the same step, aligned decoders."""

    step: int
    layer_a: int
    feature_a: int
    layer_b: int
    feature_b: int
    cosine: float


@dataclass(frozen=True)
class AnswerTracking:
    """The hypotheses of one answer at every tracked layer, with their tracks and links."""

    layers: list[int]
    steps: dict[int, list[Step]]
    tracks: list[Track]
    links: list[Link]

    @property
    def n_steps(self) -> int:
        return len(self.steps[self.layers[0]]) if self.layers else 0


def step_hypotheses(activations: torch.Tensor, k: int) -> list[Step]:
    """Per step, the (at most) `k` largest positive activations of [steps, d_sae]."""
    values, index = activations.float().topk(min(k, activations.shape[-1]), dim=-1)
    return [
        {int(f): float(v) for f, v in zip(row_i.tolist(), row_v.tolist(), strict=True) if v > 0}
        for row_v, row_i in zip(values, index, strict=True)
    ]


def hypothesis_entropy(step: Step) -> float:
    """Entropy (nats) of the activation mass normalised over the step's hypotheses.

    0 when one feature carries everything (or none is active): a settled step; log(n)
    when n features share the mass equally: n hypotheses still compete.
    """
    mass = sum(step.values())
    if mass <= 0:
        return 0.0
    return -sum((v / mass) * math.log(v / mass) for v in step.values() if v > 0)


def churn(a: Iterable[int], b: Iterable[int]) -> float:
    """1 − Jaccard of two active sets; two empty sets have not changed (0)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 0.0 if union == 0 else 1.0 - len(sa & sb) / union


def layer_tracks(layer: int, steps: list[Step]) -> list[Track]:
    """Maximal runs of consecutive steps in which each feature stays active."""
    tracks: list[Track] = []
    open_: dict[int, tuple[int, float]] = {}
    for t, step in enumerate([*steps, {}]):  # the empty sentinel closes every open track
        for feature in [f for f in open_ if f not in step]:
            birth, mass = open_.pop(feature)
            tracks.append(Track(layer, feature, birth, t - 1, mass))
        for feature, value in step.items():
            birth, mass = open_.get(feature, (t, 0.0))
            open_[feature] = (birth, mass + value)
    return sorted(tracks, key=lambda tr: (tr.birth, tr.feature))


def unit_rows(decoder: torch.Tensor) -> torch.Tensor:
    """Decoder rows scaled to unit norm (their directions), float32 on the CPU."""
    w = decoder.detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def step_links(
    a: Step, b: Step, directions_a: torch.Tensor, directions_b: torch.Tensor, threshold: float
) -> list[tuple[int, int, float]]:
    """(feature at a, feature at b, cosine) of active pairs whose decoders are aligned."""
    if not a or not b:
        return []
    fa, fb = sorted(a), sorted(b)
    cos = directions_a[fa] @ directions_b[fb].T
    return [(fa[i], fb[j], float(cos[i, j])) for i, j in torch.nonzero(cos >= threshold).tolist()]


def linked_churn(a: Step, b: Step, pairs: Iterable[tuple[int, int, float]]) -> float:
    """1 − Jaccard of two layers' active sets, with linked features counted as shared.

    Features of different SAEs have no common index, so "the same" means linked: the
    intersection is the mean of the linked counts on either side, which gives 0 for two
    layers whose hypotheses all carry over and 1 for layers with nothing in common.
    """
    if not a and not b:
        return 0.0
    pairs = list(pairs)
    shared = (len({p[0] for p in pairs}) + len({p[1] for p in pairs})) / 2
    return 1.0 - shared / (len(a) + len(b) - shared)


def track_answer(
    features: Mapping[int, torch.Tensor],
    directions: Mapping[int, torch.Tensor],
    k: int,
    threshold: float,
) -> AnswerTracking:
    """Hypotheses, tracks and cross-layer links of one answer.

    `features` maps each tracked layer to its SAE activations [steps, d_sae];
    `directions` each layer to its unit decoder rows [d_sae, d_model].
    """
    layers = sorted(features)
    steps = {layer: step_hypotheses(features[layer], k) for layer in layers}
    tracks = [tr for layer in layers for tr in layer_tracks(layer, steps[layer])]
    links = [
        Link(t, la, fa, lb, fb, cos)
        for la, lb in pairwise(layers)
        for t, (sa, sb) in enumerate(zip(steps[la], steps[lb], strict=True))
        for fa, fb, cos in step_links(sa, sb, directions[la], directions[lb], threshold)
    ]
    return AnswerTracking(layers, steps, tracks, links)
