"""Datasets: every task driftlab trains on, as prompts, full texts and gold answers.

Why it is built this way:

- One shape for every task: an `Example` holds the training `text`, the `prompt` a model is
  given at evaluation (`text` always starts with it) and the normalised gold `answer`, so
  the trainer, the extractor and the detector never special-case a dataset.
- Generated tasks (arithmetic, modular, facts) need no files and no network, so the tiny
  CPU run, the tests and a pod without hub access work as they are; corpora (gsm8k,
  tinystories, text) read local files when `data.path` is set and the Hugging Face hub
  otherwise.
- Everything random comes from `random.Random` seeded with a string built from
  `data.seed` (hashed with SHA-512 by Python, not with `hash()`), so the same spec gives
  the same examples in every process, whatever PYTHONHASHSEED is.
- `eval` never shares a text (or, for generated tasks, a problem) with `train`: it is what
  the checkpoints are scored on, and what detection asks about.
- Answers are compared after normalisation (GSM8K: `1,080` == `1080.00`), and
  `Task.extract_answer` reads a model's *continuation of the prompt*, the same thing as
  `Example.completion` for a reference, so a model is scored exactly like the data.

Caps: `train_samples`/`eval_samples` are upper bounds (both are always set, > 0). The
exception is `modular`, whose training set *is* the `train_fraction` share of all p*p
pairs, as in the grokking papers: `train_samples` does not cut it, and `eval_samples` caps
the held-out pairs scored at each checkpoint (set it to p*p or more to score all of them).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.errors import DataError, error_summary
from shared.spec import DataSpec

if TYPE_CHECKING:
    from shared.tokenizer import Tokenizer

__all__ = [
    "DATASETS",
    "DataError",
    "Example",
    "Task",
    "answer_starts",
    "error_summary",
    "gsm8k_example",
    "load_task",
    "normalize_number",
    "prompt_ids",
    "tokenize_examples",
]


AnswerStyle = Literal["hashes", "number", "phrase", "none"]

#: The separator GPT-2 style corpora (TinyStories) put between documents.
DOC_SEPARATOR = "<|endoftext|>"
GSM8K_HUB_NAME = "openai/gsm8k"
TINYSTORIES_HUB_NAME = "roneneldan/TinyStories"
#: What a corpus folder is read for (README.md or LICENSE beside the data are not corpus).
_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl",)
#: Corpus documents held out for eval: at most this share (at least one document).
_EVAL_SHARE = 10
#: Words of a corpus document given as its prompt (plain text has no question to ask).
_CORPUS_PROMPT_WORDS = 8


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
            match = _HASHES_RE.search(generated)
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


def load_task(data_spec: DataSpec) -> Task:
    """The task `data.dataset` names, deterministic for a given spec.

    Raises a one-line `DataError` when files are missing, unreadable or empty, or the hub
    cannot be reached.
    """
    loader = DATASETS.get(data_spec.dataset)
    if loader is None:
        raise DataError(
            f"data.dataset {data_spec.dataset!r} is not known; pick one of {', '.join(DATASETS)}"
        )
    task = loader(data_spec)
    if not task.train or not task.eval:
        empty = "train" if not task.train else "eval"
        raise DataError(
            f"dataset {data_spec.dataset}: the {empty} split is empty; "
            "give it more data or raise data.train_samples/eval_samples"
        )
    return task


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Tokenizer, max_length: int
) -> list[list[int]]:
    """Training sequences: each text's ids plus eos, cut to `max_length` from the end.

    The beginning is kept because it holds the prompt; eos is appended so the model
    learns to stop, which is what ends generation at evaluation.
    """
    _check_max_length(max_length)
    ids = tokenizer.encode_batch([ex.text for ex in examples])
    return [[*seq, tokenizer.eos_id][:max_length] for seq in ids]


def answer_starts(
    examples: Sequence[Example], ids: Sequence[Sequence[int]], tokenizer: Tokenizer
) -> list[int]:
    """Where each example's answer begins in its token ids `ids` (its prompt's length).

    A BPE tokenizer may merge across the prompt/answer boundary, so the prompt is the
    longest common prefix of the prompt's own ids and the full sequence's ids.
    """
    starts = []
    for example, seq in zip(examples, ids, strict=True):
        prompt = tokenizer.encode(example.prompt)
        n = 0
        while n < min(len(prompt), len(seq)) and prompt[n] == seq[n]:
            n += 1
        starts.append(n)
    return starts


def prompt_ids(
    examples: Sequence[Example], tokenizer: Tokenizer, max_length: int
) -> list[list[int]]:
    """Evaluation prompts as ids, keeping the last `max_length` tokens of a long prompt.

    The model must continue from the end of the prompt, so it is the start that is cut;
    pass the context length minus the tokens to be generated.
    """
    _check_max_length(max_length)
    ids = tokenizer.encode_batch([ex.prompt for ex in examples])
    return [seq[-max_length:] for seq in ids]


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


_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_HASHES_RE = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")
_LEADING_INT_RE = re.compile(r"\s*(-?\d+)")
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


def _check_max_length(max_length: int) -> None:
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")


def _rng(kind: str, seed: int) -> random.Random:
    """A generator that depends on the seed and the task only (string seeds: SHA-512)."""
    return random.Random(f"driftlab-data-{kind}-{seed}")


def _sample_indices(n: int, k: int, rng: random.Random) -> list[int]:
    """`k` of `range(n)` at random, in their original order (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted(rng.sample(range(n), k))


# -- arithmetic ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """A word problem applying `ops` left to right to the numbers it mentions in order."""

    key: str
    question: str
    ops: tuple[str, ...]


#: Terse on purpose: at data.max_length 64 a whole 2-step problem has 63 bytes.
_ARITHMETIC_TEMPLATES = (
    _Template("add", "{n} had {a} {i}, got {b} more. How many?", ("+",)),
    _Template("sub", "{n} had {a} {i}, lost {b}. How many left?", ("-",)),
    _Template("mul", "{n} had {a} bags of {b} {i}. How many {i}?", ("*",)),
    _Template("add-sub", "{n} had {a} {i}, got {b}, lost {c}. Now?", ("+", "-")),
    _Template("sub-add", "{n} had {a} {i}, lost {b}, got {c}. Now?", ("-", "+")),
    _Template("add-add", "{n} had {a} {i}, got {b} and {c}. Now?", ("+", "+")),
    _Template("sub-sub", "{n} had {a} {i}, lost {b} and {c}. Now?", ("-", "-")),
    _Template("mul-add", "{n} had {a} bags of {b} {i}, got {c}. Now?", ("*", "+")),
    _Template("mul-sub", "{n} had {a} bags of {b} {i}, lost {c}. Now?", ("*", "-")),
    _Template("add-mul", "{n} had {a} bags, got {b} more. {c} {i} each. Total?", ("+", "*")),
    _Template(
        "mul-add-sub", "{n} had {a} bags of {b} {i}, got {c}, lost {d}. Now?", ("*", "+", "-")
    ),
    _Template("add-sub-add", "{n} had {a} {i}, got {b}, lost {c}, got {d}. Now?", ("+", "-", "+")),
    _Template(
        "add-mul-sub",
        "{n} had {a} bags, got {b} more. {c} {i} each. {d} broke. Now?",
        ("+", "*", "-"),
    ),
)
_NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Max", "Zoe", "Leo", "Ivy")
_ITEMS = ("pens", "eggs", "cups", "toys", "hats", "keys", "cards", "books", "coins", "apples")
#: Draws per wanted problem before giving up: the space of short problems can run out.
_ARITHMETIC_TRIES = 50


def _draw_numbers(template: _Template, rng: random.Random) -> tuple[int, ...] | None:
    """Small operands for `template`; None when a subtraction would go below zero.

    One-step problems get larger numbers (up to 50 + 20): short enough to fit, and they
    keep the problem space big; longer chains stay with single-digit operands.
    """
    one_step = len(template.ops) == 1
    first = rng.randint(2, 9) if template.ops[0] == "*" else rng.randint(2, 50 if one_step else 20)
    numbers = [first]
    value = first
    for op in template.ops:
        if op == "*":
            operand = rng.randint(2, 12 if one_step else 9)
        else:
            operand = rng.randint(1, 20 if one_step else 9)
        value = _apply(op, value, operand)
        if value < 0:
            return None
        numbers.append(operand)
    return tuple(numbers)


def _apply(op: str, value: int, operand: int) -> int:
    return value * operand if op == "*" else value + operand if op == "+" else value - operand


def _render_arithmetic(
    template: _Template, numbers: tuple[int, ...], name: str, item: str
) -> tuple[str, str, int]:
    """(prompt, completion, answer): GSM8K's shape, one `x+y=z.` per step, then `#### z`."""
    slots = dict(zip("abcd", numbers, strict=False))
    question = template.question.format(n=name, i=item, **slots)
    steps = []
    value = numbers[0]
    for op, operand in zip(template.ops, numbers[1:], strict=True):
        result = _apply(op, value, operand)
        steps.append(f"{value}{op}{operand}={result}.")
        value = result
    return f"{question}\nA:", f" {' '.join(steps)} #### {value}", value


def _arithmetic(spec: DataSpec) -> Task:
    """Seeded word problems of 1-3 steps whose whole text fits `max_length` bytes.

    The byte bound holds for any tokenizer (a token is at least one byte), so no
    training text is ever truncated. At max_length 64 only 1-2 step problems fit; the
    3-step templates appear from about 80. Eval problems are drawn first, and no
    (template, numbers) pair is used twice, so eval never repeats a training problem,
    not even under another name.
    """
    rng = _rng("arithmetic", spec.seed)
    budget = spec.max_length - 1  # the trainer appends eos
    seen: set[tuple[str, tuple[int, ...]]] = set()

    def draw(count: int, split: str) -> list[Example]:
        out: list[Example] = []
        for _ in range(count * _ARITHMETIC_TRIES):
            if len(out) == count:
                break
            template = rng.choice(_ARITHMETIC_TEMPLATES)
            numbers = _draw_numbers(template, rng)
            if numbers is None or (template.key, numbers) in seen:
                continue
            prompt, completion, answer = _render_arithmetic(
                template, numbers, rng.choice(_NAMES), rng.choice(_ITEMS)
            )
            text = prompt + completion
            if len(text.encode("utf-8")) > budget:
                continue
            seen.add((template.key, numbers))
            out.append(
                Example(
                    text=text,
                    prompt=prompt,
                    answer=str(answer),
                    id=f"arithmetic-{split}-{len(out):06d}",
                    meta={"template": template.key, "steps": str(len(template.ops))},
                )
            )
        return out

    evals = draw(spec.eval_samples, "eval")
    train = draw(spec.train_samples, "train")
    if not evals or not train:
        raise DataError(
            f"dataset arithmetic: too few problems fit data.max_length {spec.max_length} "
            "(the shortest take about 55 bytes); raise data.max_length to 64 or more"
        )
    return Task("arithmetic", train, evals, "hashes")


# -- modular -------------------------------------------------------------------------------


def _modular(spec: DataSpec) -> Task:
    """`a+b=c` with c = (a + b) mod p over all p*p pairs, split by `train_fraction`.

    The set-up of the grokking papers (Power et al.; Nanda et al.): the training set is
    the seeded `train_fraction` share of the pairs, the rest is held out, and
    `eval_samples` caps (seeded) how many held-out pairs are scored.
    """
    p = spec.modular_p
    pairs = [(a, b) for a in range(p) for b in range(p)]
    rng = _rng("modular", spec.seed)
    rng.shuffle(pairs)
    n_train = min(len(pairs) - 1, max(1, round(spec.train_fraction * len(pairs))))
    held_out = pairs[n_train:]
    held_out = [held_out[i] for i in _sample_indices(len(held_out), spec.eval_samples, rng)]

    def example(a: int, b: int) -> Example:
        prompt = f"{a}+{b}="
        answer = str((a + b) % p)
        return Example(text=prompt + answer, prompt=prompt, answer=answer, id=f"modular-{a}-{b}")

    return Task(
        "modular",
        [example(a, b) for a, b in pairs[:n_train]],
        [example(a, b) for a, b in held_out],
        "number",
    )


# -- facts ---------------------------------------------------------------------------------

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "m")
_LANGUAGE_SUFFIXES = ("ish", "ic", "ese", "an")
_COLOURS = ("red", "blue", "green", "gold", "white", "black", "purple", "orange", "silver", "teal")
#: attribute -> (statement with the value last, question).
_FACT_FORMS = {
    "capital": ("The capital of {e} is {v}.", "What is the capital of {e}?"),
    "founded": ("{e} was founded in {v}.", "When was {e} founded?"),
    "flag": ("The flag of {e} is {v}.", "What colour is the flag of {e}?"),
    "language": ("In {e} people speak {v}.", "What language is spoken in {e}?"),
}
_MAX_NAME = 9


def _made_up_word(rng: random.Random, syllables: int, suffix: str = "") -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS) + suffix).capitalize()


def _fresh_word(rng: random.Random, used: set[str], make: Callable[[], str]) -> str:
    """A word never produced before in this knowledge base, at most `_MAX_NAME` letters."""
    while True:
        word = make()
        if len(word) <= _MAX_NAME and word not in used:
            used.add(word)
            return word


def _facts(spec: DataSpec) -> Task:
    """A fictional knowledge base: lands with a capital, founding year, flag and language.

    Every name is made up, so nothing is known from pre-training. Known lands (the
    `facts_known_fraction` share) are stated in training, as statements and, for all
    attributes but one, as Q/A pairs; eval asks the held-out attribute of each known land
    (knowable: stated in training, never asked — or, with `facts_asked`, asked in training
    too) and one attribute of each unknown land (any answer is invented). Eval ids read `facts-known-...`/`facts-unknown-...` and
    `meta["known"]` says the same; `Task.is_known` reads it. Eval alternates the two kinds,
    so an `eval_samples` cap keeps them balanced.
    """
    rng = _rng("facts", spec.seed)
    used: set[str] = set()
    attributes = list(_FACT_FORMS)
    lands: list[tuple[str, dict[str, str]]] = []
    for _ in range(spec.facts_entities):
        land = _fresh_word(rng, used, lambda: _made_up_word(rng, rng.choice((2, 3))))
        values = {
            "capital": _fresh_word(rng, used, lambda: _made_up_word(rng, rng.choice((1, 2)))),
            "founded": str(rng.randint(1200, 1899)),
            "flag": rng.choice(_COLOURS),
            "language": _fresh_word(
                rng, used, lambda: _made_up_word(rng, 1, rng.choice(_LANGUAGE_SUFFIXES))
            ),
        }
        lands.append((land, values))
    order = list(range(len(lands)))
    rng.shuffle(order)
    n_known = min(len(lands) - 1, max(1, round(spec.facts_known_fraction * len(lands))))
    known, unknown = order[:n_known], order[n_known:]

    def example(idx: int, attribute: str, form: str, kind: str) -> Example:
        land, values = lands[idx]
        statement, question = _FACT_FORMS[attribute]
        value = values[attribute]
        if form == "statement":
            text = statement.format(e=land, v=value)
            prompt = text[: text.rindex(value)].rstrip()
        else:
            prompt = f"Q: {question.format(e=land)}\nA:"
            text = f"{prompt} {value}"
        meta = {"entity": land, "attribute": attribute, "form": form}
        if kind != "train":
            meta["known"] = "true" if kind == "known" else "false"
        return Example(
            text=text,
            prompt=prompt,
            answer=value,
            id=f"facts-{kind}-e{idx:04d}-{attribute}-{form}",
            meta=meta,
        )

    statements: list[Example] = []
    questions: list[Example] = []
    known_eval: list[Example] = []
    for idx in known:
        held_out = rng.choice(attributes)
        for attribute in attributes:
            statements.append(example(idx, attribute, "statement", "train"))
            if attribute == held_out:
                known_eval.append(example(idx, attribute, "qa", "known"))
                if spec.facts_asked:  # trained like a statement: never cut by the cap
                    statements.append(example(idx, attribute, "qa", "train"))
            else:
                questions.append(example(idx, attribute, "qa", "train"))
    unknown_eval = [example(idx, rng.choice(attributes), "qa", "unknown") for idx in unknown]
    if len(statements) > spec.train_samples:
        raise DataError(
            f"dataset facts: the {n_known} known entities need {len(statements)} training "
            f"statements but data.train_samples is {spec.train_samples}; raise "
            "data.train_samples or lower data.facts_entities"
        )
    rng.shuffle(questions)
    train = statements + questions[: spec.train_samples - len(statements)]
    rng.shuffle(train)
    evals = [ex for pair in _alternate(known_eval, unknown_eval) for ex in pair]
    return Task("facts", train, evals[: spec.eval_samples], "phrase")


def _alternate(first: list[Example], second: list[Example]) -> Iterator[tuple[Example, ...]]:
    """(first[0], second[0]), (first[1], second[1]), ..., then the longer list's rest."""
    for i in range(max(len(first), len(second))):
        yield tuple(seq[i] for seq in (first, second) if i < len(seq))


# -- gsm8k ---------------------------------------------------------------------------------


def gsm8k_example(question: str, answer: str, example_id: str) -> Example:
    """`Question: {q}\\nAnswer: {a}` with GSM8K's calculator annotations `<<...>>` removed.

    The annotations are tool calls for GSM8K's calculator, not text a model should
    learn to write; the answer otherwise keeps its reasoning lines and `#### N` ending.
    """
    prompt = f"Question: {question}\nAnswer:"
    completion = _CALCULATOR_RE.sub("", answer)
    match = _HASHES_RE.search(completion)
    gold = normalize_number(match.group(1)) if match else None
    if gold is None:
        raise DataError(
            f"gsm8k example {example_id}: the answer has no '#### <number>' line; "
            "is this GSM8K data?"
        )
    return Example(text=f"{prompt} {completion}", prompt=prompt, answer=gold, id=example_id)


def _gsm8k(spec: DataSpec) -> Task:
    """GSM8K: the train split (capped, seeded) to train on, the test split to score on.

    `data.path` is a folder with train.jsonl + test.jsonl, or one .jsonl file whose
    seeded held-out slice becomes eval; without it, `openai/gsm8k` (config main) is
    loaded from the hub.
    """
    rng = _rng("gsm8k", spec.seed)
    if spec.path is None:
        splits = _hub_gsm8k(spec.hub_name or GSM8K_HUB_NAME)
        train_rows, eval_rows = splits["train"], splits["test"]
    else:
        path = _existing(spec.path, "gsm8k")
        if path.is_dir():
            train_rows = _gsm8k_rows(_jsonl_file(path / "train.jsonl", "gsm8k"), "train")
            eval_rows = _gsm8k_rows(_jsonl_file(path / "test.jsonl", "gsm8k"), "test")
        else:
            rows = _gsm8k_rows(path, path.stem)
            eval_idx = set(_held_out(len(rows), spec.eval_samples, rng, path))
            train_rows = [row for i, row in enumerate(rows) if i not in eval_idx]
            eval_rows = [row for i, row in enumerate(rows) if i in eval_idx]
    train = [train_rows[i] for i in _sample_indices(len(train_rows), spec.train_samples, rng)]
    evals = [eval_rows[i] for i in _sample_indices(len(eval_rows), spec.eval_samples, rng)]
    return Task("gsm8k", train, evals, "hashes")


def _gsm8k_rows(path: Path, split: str) -> list[Example]:
    rows = []
    for line_no, record in _read_jsonl(path):
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(
                f'{path}:{line_no}: expected {{"question": ..., "answer": ...}} strings; '
                "is this GSM8K data?"
            )
        rows.append(gsm8k_example(question, answer, f"gsm8k-{split}-{line_no - 1:05d}"))
    if not rows:
        raise DataError(f"{path}: has no examples; point data.path at GSM8K's jsonl files")
    return rows


def _hub_gsm8k(name: str) -> dict[str, list[Example]]:
    dataset = _hub_load(name, "main")
    try:
        return {
            split: [
                gsm8k_example(row["question"], row["answer"], f"gsm8k-{split}-{i:05d}")
                for i, row in enumerate(dataset[split])
            ]
            for split in ("train", "test")
        }
    except KeyError as err:
        raise DataError(
            f"dataset {name}: has no {err} split or field; expected GSM8K's train/test splits "
            "of question/answer rows"
        ) from None


# -- corpora: tinystories and text ---------------------------------------------------------


def _corpus_example(text: str, example_id: str) -> Example:
    """A document; its prompt is its first words, so the detector can let a model go on."""
    cuts = [m.start() for m in re.finditer(r"\s+", text)]  # where each word ends
    # At most half the words, so a short document still leaves something to continue.
    prompt = text[: cuts[min(_CORPUS_PROMPT_WORDS, len(cuts) // 2 + 1) - 1]] if cuts else ""
    return Example(text=text, prompt=prompt, answer=None, id=example_id)


def _corpus(name: str, spec: DataSpec) -> Task:
    """Documents from `data.path` split seeded into train and a held-out eval slice.

    Eval takes at most `eval_samples` documents and at most a tenth of the corpus (at
    least one), so a small corpus still keeps most of itself for training.
    """
    assert spec.path is not None
    path = _existing(spec.path, name)
    documents = _read_documents(path)
    rng = _rng(name, spec.seed)
    eval_idx = _held_out(len(documents), spec.eval_samples, rng, path)
    held = set(eval_idx)
    rest = [i for i in range(len(documents)) if i not in held]
    train_idx = [rest[i] for i in _sample_indices(len(rest), spec.train_samples, rng)]
    return Task(
        name,
        [_corpus_example(documents[i], f"{name}-{i:06d}") for i in train_idx],
        [_corpus_example(documents[i], f"{name}-{i:06d}") for i in eval_idx],
        "none",
    )


def _held_out(n: int, eval_samples: int, rng: random.Random, path: Path) -> list[int]:
    if n < 2:
        raise DataError(
            f"{path}: has {n} document(s); at least 2 are needed to hold one out for eval"
        )
    return _sample_indices(n, min(eval_samples, max(1, n // _EVAL_SHARE)), rng)


def _tinystories(spec: DataSpec) -> Task:
    """TinyStories from local files (`data.path`) or the hub's train/validation splits.

    From the hub the splits are streamed and shuffled (seeded, in a buffer), so a run
    reads only the stories it keeps instead of downloading the whole 2 GB corpus.
    """
    if spec.path is not None:
        return _corpus("tinystories", spec)
    name = spec.hub_name or TINYSTORIES_HUB_NAME
    try:
        train = _stream_texts(name, "train", spec.train_samples, spec.seed)
        evals = _stream_texts(name, "validation", spec.eval_samples, spec.seed)
    except DataError:
        raise
    except Exception as err:  # the stream fetches while it is read: network errors land here
        raise DataError(
            f"dataset {name}: reading it from the Hugging Face hub failed ({error_summary(err)}); "
            "connect to the hub or set data.path to local .txt/.jsonl files"
        ) from None
    return Task(
        "tinystories",
        [_corpus_example(text, f"tinystories-train-{i:06d}") for i, text in enumerate(train)],
        [_corpus_example(text, f"tinystories-eval-{i:06d}") for i, text in enumerate(evals)],
        "none",
    )


def _stream_texts(name: str, split: str, count: int, seed: int) -> list[str]:
    stream = _hub_load(name, split=split, streaming=True).shuffle(seed=seed, buffer_size=10_000)
    texts: list[str] = []
    for row in stream:
        text = str(row.get("text", "")).strip()
        if text:
            texts.append(text)
        if len(texts) == count:
            break
    return texts


def _text(spec: DataSpec) -> Task:
    """Any local corpus: .txt files (documents split on <|endoftext|> lines, or else on
    blank lines) or .jsonl with a "text" field; a folder is read recursively in name
    order, and a file named directly is read as text whatever its suffix."""
    if spec.path is None:
        raise DataError("dataset text needs data.path: a .txt/.jsonl file or a folder of them")
    return _corpus("text", spec)


def _read_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES + _JSONL_SUFFIXES
        )
        if not files:
            raise DataError(
                f"{path}: holds no .txt or .jsonl files; put the corpus there or "
                "point data.path at a file"
            )
    else:
        files = [path]
    documents: list[str] = []
    for file in files:
        if file.suffix.lower() in _JSONL_SUFFIXES:
            documents.extend(_jsonl_texts(file))
        else:
            documents.extend(_split_documents(_read_text(file)))
    if not documents:
        raise DataError(f"{path}: has no text; point data.path at a non-empty corpus")
    return documents


def _split_documents(text: str) -> list[str]:
    """Documents separated by <|endoftext|> lines, or else by blank lines."""
    parts = text.split(DOC_SEPARATOR) if DOC_SEPARATOR in text else re.split(r"\n\s*\n", text)
    return [doc.strip() for doc in parts if doc.strip()]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for line_no, record in _read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f'{path}:{line_no}: expected a "text" string in every line')
        if text.strip():
            texts.append(text.strip())
    return texts


# -- files and the hub ---------------------------------------------------------------------


def _existing(raw: str, dataset: str) -> Path:
    path = Path(raw).expanduser()
    if not path.exists():
        raise DataError(
            f"data.path {raw}: no such file or folder for dataset {dataset}; fix the path "
            "or leave data.path out to load it from the Hugging Face hub"
            if dataset != "text"
            else f"data.path {raw}: no such file or folder; fix the path"
        )
    return path


def _jsonl_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise DataError(
            f"{path}: not found; a {dataset} folder needs train.jsonl and test.jsonl "
            "(or point data.path at one .jsonl file)"
        )
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: is not UTF-8 text; convert it or remove it from data.path"
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check its permissions") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSON-lines file."""
    rows = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object per line")
        rows.append((line_no, record))
    return rows


def _hub_load(name: str, *args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, with every failure (offline, no such dataset) one line."""
    try:
        import datasets

        return datasets.load_dataset(name, *args, **kwargs)
    except Exception as err:  # network, auth, missing config: the user's fix is the same
        raise DataError(
            f"dataset {name}: could not load it from the Hugging Face hub ({error_summary(err)}); "
            "connect to the hub or set data.path to a local copy"
        ) from None


#: data.dataset -> loader. Every name DataSpec allows is here.
DATASETS: dict[str, Callable[[DataSpec], Task]] = {
    "arithmetic": _arithmetic,
    "modular": _modular,
    "facts": _facts,
    "gsm8k": _gsm8k,
    "tinystories": _tinystories,
    "text": _text,
}
