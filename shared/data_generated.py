"""Generated tasks: arithmetic word problems, modular addition and a fictional knowledge base.

They need no files and no network, so the tiny CPU run, the tests and a pod without hub
access work as they are; everything random comes from `seeded_rng`, so a spec gives the
same examples in every process.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shared.data_examples import Example, Task, sample_indices, seeded_rng
from shared.errors import DataError
from shared.spec import DataSpec

__all__ = ["load_arithmetic", "load_facts", "load_modular"]


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


def load_arithmetic(spec: DataSpec) -> Task:
    """Seeded word problems of 1-3 steps whose whole text fits `max_length` bytes.

    The byte bound holds for any tokenizer (a token is at least one byte), so no
    training text is ever truncated. At max_length 64 only 1-2 step problems fit; the
    3-step templates appear from about 80. Eval problems are drawn first, and no
    (template, numbers) pair is used twice, so eval never repeats a training problem,
    not even under another name.
    """
    rng = seeded_rng("arithmetic", spec.seed)
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


def load_modular(spec: DataSpec) -> Task:
    """`a+b=c` with c = (a + b) mod p over all p*p pairs, split by `train_fraction`.

    The set-up of the grokking papers (Power et al.; Nanda et al.): the training set is
    the seeded `train_fraction` share of the pairs, the rest is held out, and
    `eval_samples` caps (seeded) how many held-out pairs are scored.
    """
    p = spec.modular_p
    pairs = [(a, b) for a in range(p) for b in range(p)]
    rng = seeded_rng("modular", spec.seed)
    rng.shuffle(pairs)
    n_train = min(len(pairs) - 1, max(1, round(spec.train_fraction * len(pairs))))
    held_out = pairs[n_train:]
    held_out = [held_out[i] for i in sample_indices(len(held_out), spec.eval_samples, rng)]

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
_FRESH_ATTEMPTS = 10_000


def _made_up_word(rng: random.Random, syllables: int, suffix: str = "") -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS) + suffix).capitalize()


def _fresh_word(rng: random.Random, used: set[str], make: Callable[[], str]) -> str:
    """A word never produced before in this knowledge base, at most `_MAX_NAME` letters.

    Bounded: a name with few vowels has few one-vowel variants, and asking for more
    spellings than exist must fail rather than loop.
    """
    for _ in range(_FRESH_ATTEMPTS):
        word = make()
        if len(word) <= _MAX_NAME and word not in used:
            used.add(word)
            return word
    raise DataError(
        f"dataset facts: no new name after {_FRESH_ATTEMPTS} draws (a land's name has too few "
        "vowels for its spellings and twin): lower data.facts_spellings"
    )


def load_facts(spec: DataSpec) -> Task:
    """A fictional knowledge base: lands with a capital, founding year, flag and language.

    Every name is made up, so nothing is known from pre-training. Known lands (the
    `facts_known_fraction` share) are stated in training, as statements and, for all
    attributes but one, as Q/A pairs; eval asks the held-out attribute of each known land
    (knowable: stated in training, never asked — or, with `facts_asked`, asked in training
    too) and one attribute of each unknown land (any answer is invented). Eval ids read `facts-known-...`/`facts-unknown-...` and
    `meta["known"]` says the same; `Task.is_known` reads it. Eval alternates the two kinds,
    so an `eval_samples` cap keeps them balanced. With `facts_spellings` above 1 each known
    land's statements and Q/A pairs are repeated under its other spellings; eval asks under
    its name.
    """
    rng = seeded_rng("facts", spec.seed)
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

    spellings_rng = seeded_rng("facts-spellings", spec.seed)  # its own stream, as the twins'
    spellings = {
        idx: _spellings(spellings_rng, used, lands[idx][0], spec.facts_spellings) for idx in known
    }

    def example(idx: int, attribute: str, form: str, kind: str, land: str = "") -> Example:
        """One statement or Q/A of land `idx`, under the spelling `land` (default its name)."""
        land, values = land or lands[idx][0], lands[idx][1]
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
            id=f"facts-{kind}-e{idx:04d}-{attribute}-{form}"
            + ("" if land == lands[idx][0] else f"-{land.lower()}"),
            meta=meta,
        )

    statements: list[Example] = []
    questions: list[Example] = []
    known_eval: list[Example] = []
    for idx in known:
        held_out = rng.choice(attributes)
        for attribute in attributes:
            for name in spellings[idx]:
                statements.append(example(idx, attribute, "statement", "train", name))
                if attribute != held_out:
                    questions.append(example(idx, attribute, "qa", "train", name))
                elif spec.facts_asked:  # trained like a statement: never cut by the cap
                    statements.append(example(idx, attribute, "qa", "train", name))
            if attribute == held_out:
                known_eval.append(example(idx, attribute, "qa", "known"))
    unknown_eval = [example(idx, rng.choice(attributes), "qa", "unknown") for idx in unknown]
    if spec.facts_unknown == "confusable":  # its own stream: the training set stays the same
        twins_rng = seeded_rng("facts-confusable", spec.seed)
        asked = [ex.meta["attribute"] for ex in known_eval]
        unknown_eval = _confusable_twins(twins_rng, used, lands, known, asked, unknown, example)
        for ex in known_eval:  # a twin and its known land: one group for the detect split
            ex.meta["pair"] = ex.meta["entity"]
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


def _confusable_twins(
    rng: random.Random,
    used: set[str],
    lands: list[tuple[str, dict[str, str]]],
    known: list[int],
    asked: list[str],
    unknown: list[int],
    example: Callable[[int, str, str, str], Example],
) -> list[Example]:
    """Eval questions on unknown lands renamed after known ones, one letter changed.

    Each unknown land takes the name of a known land (in turn) with one vowel swapped, so
    it reads almost like a land the model memorised, and is asked what its twin is asked
    in eval (`asked`), with a value that differs from the twin's: answering the twin's
    fact, as a model that keys on the name's look will, is a confident invention. Asking
    the twins the same attributes keeps the kind of question (a year, a colour, a name)
    from telling known and unknown lands apart: the first version drew the attribute at
    random, and answer length alone then ranked them (AUROC 0.275, inverted).
    """
    questions = []
    for n, idx in enumerate(unknown):
        twin_name, twin_values = lands[known[n % len(known)]]
        name = _fresh_word(rng, used, functools.partial(_one_vowel_changed, rng, twin_name))
        values = dict(lands[idx][1])
        attribute = asked[n % len(asked)]
        if values[attribute] == twin_values[attribute]:  # names are unique: a flag or a year
            values[attribute] = (
                rng.choice([c for c in _COLOURS if c != values[attribute]])
                if attribute == "flag"
                else str(1200 + (int(values[attribute]) - 1200 + rng.randint(1, 699)) % 700)
            )
        lands[idx] = (name, values)
        question = example(idx, attribute, "qa", "unknown")
        question.meta["pair"] = twin_name
        questions.append(question)
    return questions


def _spellings(rng: random.Random, used: set[str], name: str, count: int) -> list[str]:
    """`name` and `count - 1` new variants of it, each with one vowel changed."""
    variant = functools.partial(_one_vowel_changed, rng, name)
    return [name, *(_fresh_word(rng, used, variant) for _ in range(count - 1))]


def _one_vowel_changed(rng: random.Random, word: str) -> str:
    """`word` with one of its vowels (not the first letter) replaced by another vowel."""
    vowels = "aeiou"
    spots = [i for i, c in enumerate(word) if i > 0 and c in vowels]
    i = rng.choice(spots)
    return word[:i] + rng.choice([v for v in vowels if v != word[i]]) + word[i + 1 :]


def _alternate(first: list[Example], second: list[Example]) -> Iterator[tuple[Example, ...]]:
    """(first[0], second[0]), (first[1], second[1]), ..., then the longer list's rest."""
    for i in range(max(len(first), len(second))):
        yield tuple(seq[i] for seq in (first, second) if i < len(seq))
