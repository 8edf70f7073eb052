"""The trainer's verdict on its own run: did the model learn anything?

Two questions a researcher asks before looking at any drift or feature: is the final model
better than a trivial answerer, and did the training loss fall at all? Chance is the
accuracy of always giving the held-out split's most common answer (1/p for modular
addition), so a model "below chance" really is worse than a constant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from shared.data import Example
from shared.quality import QualityCheck, at_most, judged

STAGE = "train"
#: Final training loss over the first logged one: above this the loss barely moved.
LOSS_RATIO_FAIL = 0.99
LOSS_RATIO_WARN = 0.9


def chance_accuracy(examples: Sequence[Example]) -> float:
    """Accuracy of always answering the most common gold answer of `examples`."""
    answers = Counter(ex.answer for ex in examples if ex.answer is not None)
    return max(answers.values()) / len(examples) if answers else 0.0


def trainer_checks(
    final_eval: Mapping[str, Any],
    eval_examples: Sequence[Example],
    metrics_rows: Sequence[Mapping[str, Any]],
) -> list[QualityCheck]:
    """Verdicts on the final checkpoint's held-out accuracy and the training-loss curve."""
    checks: list[QualityCheck] = []
    accuracy = final_eval.get("eval_accuracy")
    if accuracy is not None and eval_examples:
        chance = chance_accuracy(eval_examples)
        value = float(accuracy)
        if value > chance:
            check = judged(STAGE, "final_accuracy", value, chance, "ok",
                           f"final held-out accuracy {value:.3f} > chance {chance:.3f}")  # fmt: skip
        else:
            message = (
                f"final held-out accuracy {value:.3f} is not above chance {chance:.3f} (always "
                "giving the most common answer): train longer (train.steps), raise "
                "train.learning_rate, or use a larger model"
            )
            check = judged(STAGE, "final_accuracy", value, chance, "fail", message)
        checks.append(check)
    losses = [float(row["loss"]) for row in metrics_rows if "loss" in row]
    if len(losses) >= 2 and losses[0] > 0:
        checks.append(
            at_most(
                STAGE,
                "loss_ratio",
                losses[-1] / losses[0],
                what=f"final training loss {losses[-1]:.3g} over the first logged {losses[0]:.3g}",
                fix="the loss is not falling: raise train.learning_rate or train.steps, "
                "or lower train.weight_decay",
                fail=LOSS_RATIO_FAIL,
                warn=LOSS_RATIO_WARN,
            )
        )
    return checks
