"""What every task shares: examples, tasks, how an answer is read, seeded sampling.

Kept apart from the loaders so that every loader (generated or read from files) and every
consumer (trainer, extractor, detector) depends on this one small module, not on each
other.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Literal

__all__ = [
    "DOC_SEPARATOR",
    "HASHES_RE",
    "AnswerStyle",
    "Example",
    "Task",
    "normalize_number",
    "sample_indices",
    "seeded_rng",
]

AnswerStyle = Literal["hashes", "number", "phrase", "none"]

#: The separator GPT-2 style corpora (TinyStories) put between documents.
DOC_SEPARATOR = "<|endoftext|>"
#: GSM8K's final answer line, `#### 1,080`: group 1 is the number as written.
HASHES_RE = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_LEADING_INT_RE = re.compile(r"\s*(-?\d+)")


@dataclass(frozen=True)
class Example:
    """One training text and how it is asked at evaluation.

    `text` is the full training text (prompt + completion, no eos: the trainer appends
    it); `prompt` ends exactly where the model must continue; `answer` is the normalised
    gold answer (None for plain text); `id` is stable and unique within the task (the
    detector splits by it); `meta` holds task-specific labels, e.g. facts' `known`.
    """

    text: str
    prompt: str
    answer: str | None
    id: str
    meta: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.text.startswith(self.prompt):
            raise ValueError(f"example {self.id}: text does not start with its prompt")

    @property
    def completion(self) -> str:
        """What the model should write after the prompt: the reference continuation."""
        return self.text[len(self.prompt) :]


@dataclass(frozen=True)
class Task:
    """A dataset ready to train and score on; `answer_style` says how answers are read."""

    name: str
    train: list[Example]
    eval: list[Example]
    answer_style: AnswerStyle

    @property
    def has_answers(self) -> bool:
        """Whether eval can be scored by exact match (False for plain text corpora)."""
        return self.answer_style != "none"

    def extract_answer(self, generated: str) -> str | None:
        """The normalised final answer in a model's continuation of the prompt, or None.

        `generated` is what follows the prompt (`Example.completion` for the reference).
        GSM8K-style tasks (arithmetic, gsm8k) also accept the full text, since the prompt
        has no `####`. Only the first answer counts: a model that goes on to invent the
        next question is scored on what it answered first. No answer format -> None.
        Text after an end-of-text token (decoders write it out) is ignored.
        """
        generated = generated.split(DOC_SEPARATOR, 1)[0]
        if self.answer_style == "hashes":
            match = HASHES_RE.search(generated)
            return normalize_number(match.group(1)) if match else None
        if self.answer_style == "number":
            match = _LEADING_INT_RE.match(generated)
            return match.group(1) if match else None
        if self.answer_style == "phrase":
            first_line = generated.strip().split("\n", 1)[0]
            phrase = first_line.strip().rstrip(".!?,;:").strip()
            return phrase or None
        return None

    def is_correct(self, generated: str, gold: str) -> bool:
        """Whether the answer in `generated` (a continuation) equals the gold answer.

        Numbers compare after normalisation; phrases (facts) ignore letter case.
        """
        found = self.extract_answer(generated)
        if found is None:
            return False
        if self.answer_style == "phrase":
            return found.casefold() == gold.strip().casefold()
        return found == (normalize_number(gold) or gold.strip())

    def is_known(self, example: Example) -> bool | None:
        """For facts: whether the answer was stated in training (None for other tasks)."""
        known = example.meta.get("known")
        return None if known is None else known == "true"


def normalize_number(raw: str) -> str | None:
    """`raw` as a canonical number string, or None when it is not a number.

    Strips spaces, `$`, thousands commas and a trailing full stop, then writes the value
    without trailing zeros: `$1,080.` -> `1080`, `2.50` -> `2.5`, `-3` -> `-3`.
    """
    text = raw.strip().replace(",", "").replace("$", "").strip().rstrip(".")
    if not _NUMBER_RE.fullmatch(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


# -- seeded sampling, the same in every process -------------------------------------------


def seeded_rng(kind: str, seed: int) -> random.Random:
    """A generator that depends on the seed and the task only (string seeds: SHA-512)."""
    return random.Random(f"driftlab-data-{kind}-{seed}")


def sample_indices(n: int, k: int, rng: random.Random) -> list[int]:
    """`k` of `range(n)` at random, in their original order (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted(rng.sample(range(n), k))
