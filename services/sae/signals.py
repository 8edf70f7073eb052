"""Per-answer signals, each oriented so that higher means "more likely hallucinated".

The orientation is fixed in advance from the hypothesis being tested (GhostTrack: an
invented answer is written while more features compete, and they turn over faster), not
fitted to the labels: a signal whose AUROC lands below 0.5 is then evidence against the
hypothesis rather than something silently flipped. The baselines follow the usual
reading: uncertain predictions, an unlikely token, a long answer.
"""

from __future__ import annotations

import re
from itertools import pairwise
from statistics import fmean

from services.sae.generate import Generation
from services.sae.tracking import AnswerTracking, churn, hypothesis_entropy, linked_churn

POOLED_DESCRIPTIONS = {
    "hyp_entropy_mean": "hypothesis entropy (activation mass over active SAE features), "
    "mean over steps and tracked layers",
    "hyp_entropy_max": "hypothesis entropy, max over steps and tracked layers",
    "churn_step_mean": "1 - Jaccard of consecutive steps' active feature sets, mean over "
    "steps and layers",
    "churn_step_max": "1 - Jaccard of consecutive steps' active sets, max over steps and layers",
    "churn_layer_mean": "1 - Jaccard of adjacent tracked layers' active sets (decoder-aligned "
    "features count as shared), mean over steps and layer pairs",
    "track_transience": "1 - mean track length as a share of the answer's steps",
    "track_births_per_step": "tracks started per step and tracked layer",
    "tracks_concurrent_mean": "tracks alive at once (active features), mean over steps and layers",
}
BASELINE_DESCRIPTIONS = {
    "baseline_pred_entropy": "predictive entropy of the next-token distribution, mean over steps",
    "baseline_min_token_prob": "minus the smallest probability of a token taken in the answer",
    "baseline_answer_length": "generated tokens in the answer",
    "baseline_dense_probe": "logistic regression on the mean residual stream over the answer's "
    "steps at the layer chosen by cross-validation on the train split",
}
DETECTOR_DESCRIPTION = (
    "logistic regression on every SAE tracking signal (standardised), fitted on the train split"
)
COMBINED_DESCRIPTION = (
    "logistic regression on every SAE tracking signal and the model's own baselines "
    "(entropy, minimum token probability, length), fitted on the train split"
)
_PER_LAYER_DESCRIPTIONS = {
    "hyp_entropy_mean": "hypothesis entropy, mean over steps",
    "hyp_entropy_max": "hypothesis entropy, max over steps",
    "churn_step_mean": "1 - Jaccard of consecutive steps' active sets, mean over steps",
}
_PER_LAYER = re.compile(r"^(hyp_entropy_mean|hyp_entropy_max|churn_step_mean)_l(\d+)$")


def tracking_signals(tracking: AnswerTracking) -> dict[str, float]:
    """The pooled signals and, per tracked layer, entropy (mean, max) and step churn."""
    layers, n = tracking.layers, tracking.n_steps
    entropies = {layer: [hypothesis_entropy(s) for s in tracking.steps[layer]] for layer in layers}
    step_churn = {
        layer: [churn(a, b) for a, b in pairwise(seq)] or [0.0]
        for layer, seq in tracking.steps.items()
    }
    links_at: dict[tuple[int, int], list[tuple[int, int, float]]] = {}
    for link in tracking.links:
        links_at.setdefault((link.step, link.layer_a), []).append(
            (link.feature_a, link.feature_b, link.cosine)
        )
    layer_churn = [
        linked_churn(tracking.steps[la][t], tracking.steps[lb][t], links_at.get((t, la), []))
        for la, lb in pairwise(layers)
        for t in range(n)
    ] or [0.0]
    all_entropy = [e for seq in entropies.values() for e in seq]
    all_churn = [c for seq in step_churn.values() for c in seq]
    lengths = [tr.length / n for tr in tracking.tracks]
    signals = {
        "hyp_entropy_mean": fmean(all_entropy),
        "hyp_entropy_max": max(all_entropy),
        "churn_step_mean": fmean(all_churn),
        "churn_step_max": max(all_churn),
        "churn_layer_mean": fmean(layer_churn),
        "track_transience": 1.0 - (fmean(lengths) if lengths else 0.0),
        "track_births_per_step": len(tracking.tracks) / (n * len(layers)),
        "tracks_concurrent_mean": fmean(len(s) for layer in layers for s in tracking.steps[layer]),
    }
    for layer in layers:
        signals[f"hyp_entropy_mean_l{layer:02d}"] = fmean(entropies[layer])
        signals[f"hyp_entropy_max_l{layer:02d}"] = max(entropies[layer])
        signals[f"churn_step_mean_l{layer:02d}"] = fmean(step_churn[layer])
    return signals


def model_baselines(generation: Generation) -> dict[str, float]:
    """Signals of the model's own outputs in the same pass (no SAE involved)."""
    return {
        "baseline_pred_entropy": float(generation.entropy.mean()),
        "baseline_min_token_prob": -float(generation.token_prob.min()),
        "baseline_answer_length": float(len(generation.tokens)),
    }


def describe(name: str) -> str:
    """What a signal measures, for `detect/metrics.json`."""
    if name in POOLED_DESCRIPTIONS:
        return POOLED_DESCRIPTIONS[name]
    if name in BASELINE_DESCRIPTIONS:
        return BASELINE_DESCRIPTIONS[name]
    if name == "detector":
        return DETECTOR_DESCRIPTION
    if name == "detector_combined":
        return COMBINED_DESCRIPTION
    match = _PER_LAYER.match(name)
    if match is None:
        raise KeyError(f"no description of signal {name!r}")
    return f"{_PER_LAYER_DESCRIPTIONS[match.group(1)]}, at layer {int(match.group(2))}"
