"""The detect stage's verdict on its own test split: is there enough to judge a detector?

An AUROC on six examples of a class, or one whose bootstrap interval still contains 0.5,
says nothing about whether SAE features reveal hallucinations; the report must say so
before it shows the number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.quality import QualityCheck, at_least, judged

STAGE = "detect"
#: Labelled answers of each class the test split should hold for an AUROC to mean much.
MIN_TEST_PER_CLASS = 20


def detection_checks(metrics: Mapping[str, Any], detector: str) -> list[QualityCheck]:
    """Verdicts on the test split's size per class and on the detector's AUROC interval."""
    test: Mapping[str, int] = metrics["class_balance"]["test"]
    smallest_class = min(test, key=lambda label: test[label])
    checks = [
        at_least(
            STAGE,
            "test_answers_per_class",
            float(test[smallest_class]),
            what=f"{smallest_class} answers in the detection test split",
            fix="raise detect.samples (or detect.num_samples) so each class has at least "
            f"{MIN_TEST_PER_CLASS}",
            warn=MIN_TEST_PER_CLASS,
        )
    ]
    scores = metrics.get("scores") or {}
    ci = (scores.get(detector) or {}).get("ci95")
    if ci is not None:
        low, high = float(ci[0]), float(ci[1])
        auroc = float(scores[detector]["auroc"])
        interval = f"detector AUROC {auroc:.3f} [{low:.3f}, {high:.3f}]"
        if low <= 0.5 <= high:
            message = (
                f"{interval} contains 0.5: not distinguishable from chance; raise "
                "detect.samples for a larger test split, or train the model and SAEs further"
            )
            checks.append(judged(STAGE, "detector_auroc_ci", auroc, 0.5, "warn", message))
        else:
            side = "above" if low > 0.5 else "below"
            checks.append(
                judged(STAGE, "detector_auroc_ci", auroc, 0.5, "ok", f"{interval} is {side} 0.5")
            )
    checks += _against_best_baseline(metrics.get("against_best_baseline"), detector)
    return checks


def _against_best_baseline(versus: Mapping[str, Any] | None, detector: str) -> list[QualityCheck]:
    """Does the detector beat the model's own best signal (the claim SAE detection makes)?

    A detector below the entropy of the model's own output distribution shows nothing SAE
    features add, whatever its AUROC against chance; the report says so in its banner.
    """
    versus = versus or {}
    entry = versus.get(detector)
    if entry is None or entry.get("ci95") is None:
        return []
    difference = float(entry["auroc_difference"])
    low, high = (float(v) for v in entry["ci95"])
    said = (
        f"detector AUROC minus {versus['baseline']}'s ({versus['auroc']:.3f}): "
        f"{difference:+.3f} [{low:+.3f}, {high:+.3f}] by question"
    )
    if entry["beats_baseline"]:
        return [judged(STAGE, "detector_vs_best_baseline", difference, 0.0, "ok", f"{said}: above")]
    message = (
        f"{said}: the SAE signals add nothing over the model's own uncertainty here; use a "
        "task whose easy baselines fail (configs/facts-confusable.yaml) and more questions "
        "(detect.samples) before claiming they do"
    )
    return [judged(STAGE, "detector_vs_best_baseline", difference, 0.0, "warn", message)]
