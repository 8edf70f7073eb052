"""Verdicts on one layer's SAE, from the held-out metrics in its `sae.json`.

An SAE can train without error and still explain nothing: with eight training steps every
layer's SAE reconstructed worse than the tokens' mean (explained variance below 0). The
thresholds follow what SAE papers report for usable dictionaries (explained variance of
0.8 and more, CE loss recovered of 0.8 and more, few dead latents); each warn or fail says
which spec field to change. Dead features waste capacity but do not make the live ones
wrong, so only a collapsed dictionary (90% dead) fails: a toy model's activations can have
so few dimensions (99% of the variance in 5 to 15 of 64 on the demo) that a sparse
dictionary of 320 features leaves most unused. Kept apart from the stage so the checks can
be tested on hand-made metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.quality import QualityCheck, at_least, at_most, judged
from shared.spec import SAESpec

STAGE = "sae"
#: Held-out tokens below which the metrics are too noisy to trust.
MIN_HELD_OUT_TOKENS = 1000

#: Per arch: (the change that makes codes sparser, the change that makes them denser).
_SPARSITY_KNOBS = {
    "jumprelu": ("raise sae.l0_coeff", "lower sae.l0_coeff"),
    "relu": ("raise sae.l1_coeff", "lower sae.l1_coeff"),
    "topk": ("lower sae.k", "raise sae.k"),
}


def sae_checks(
    metrics: Mapping[str, Any], d_in: int, evaluation: Mapping[str, Any], spec: SAESpec
) -> list[QualityCheck]:
    """Explained variance, FVU, dead share, L0, held-out tokens and CE loss recovered."""
    sparser, denser = _SPARSITY_KNOBS[spec.arch]
    more = "train on more tokens (sae.tokens)"
    return [
        at_least(STAGE, "explained_variance", metrics["explained_variance"],
                 what="held-out explained variance", fix=f"{more} or {denser}",
                 fail=0.5, warn=0.8),
        at_most(STAGE, "fvu", metrics["fvu"],
                what="held-out FVU (1 = no better than the tokens' mean)",
                fix=f"{more}, or lower sae.lr if the loss did not fall", fail=1.0),
        at_most(STAGE, "dead_fraction", metrics["dead_fraction"],
                what="share of features never firing on held-out tokens",
                fix=f"lower sae.expansion (the activations may need fewer features) or {denser}",
                fail=0.9, warn=0.1),
        _l0(metrics["l0"], d_in, sparser, denser),
        _held_out_tokens(evaluation, spec.source),
        at_least(STAGE, "ce_loss_recovered", metrics["ce"]["ce_loss_recovered"],
                 what="CE loss recovered with the SAE spliced in", fix=f"{more} or {denser}",
                 fail=0.5, warn=0.8),
    ]  # fmt: skip


def _l0(l0: float, d_in: int, sparser: str, denser: str) -> QualityCheck:
    """Active features per token: fewer than half the input dimensions, at least one."""
    if l0 < 1:
        message = f"L0 {l0:.3g} is below 1: most tokens use no feature at all; {denser}"
        return judged(STAGE, "l0", l0, 1.0, "warn", message)
    what = f"L0 (active features per token, of d_in {d_in})"
    fix = f"the code is not sparse; {sparser}"
    return at_most(STAGE, "l0", l0, what=what, fix=fix, warn=d_in / 2, fail=d_in)


def _held_out_tokens(evaluation: Mapping[str, Any], source: str) -> QualityCheck:
    """Enough unseen tokens behind the metrics; none at all when they are training tokens."""
    if source == "stream":
        fix = "raise sae.eval_tokens, or data.eval_samples when the eval split is smaller"
    else:
        fix = "raise extract.probe_samples or sae.holdout_fraction, or use sae.source: stream"
    tokens = evaluation["tokens"] if evaluation["held_out"] else 0
    return at_least(STAGE, "held_out_tokens", float(tokens), what="held-out tokens",
                    fix=fix, warn=MIN_HELD_OUT_TOKENS)  # fmt: skip
