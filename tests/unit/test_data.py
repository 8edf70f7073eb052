"""Datasets: determinism, disjoint splits, answer extraction, caps and one-line errors.

Local reference data is read from beside the checkout (never copied into the project);
the hub paths are exercised with a stand-in `datasets` module, so nothing goes online.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shared.data import (
    DataError,
    Example,
    Task,
    load_task,
    normalize_number,
    prompt_ids,
    tokenize_examples,
)
from shared.data_generated import _fresh_word
from shared.errors import DriftlabError
from shared.spec import DataSpec
from shared.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from tests.support import REFERENCE, ROOT

GSM8K_DIR = REFERENCE / "gsm8k"
TINYSTORIES_DIR = REFERENCE / "tinystories"
GENERATED = ("arithmetic", "modular", "facts")


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"reference data not found at {path}: the tests read ../shared/data beside the checkout"
        )
    return path


def spec(**fields: Any) -> DataSpec:
    return DataSpec(**fields)


def texts(examples: list[Example]) -> list[str]:
    return [ex.text for ex in examples]


def check_task_shape(task: Task) -> None:
    """What every task promises: disjoint splits, unique ids, text = prompt + completion."""
    assert task.train and task.eval
    assert not set(texts(task.train)) & set(texts(task.eval))
    ids = [ex.id for ex in task.train + task.eval]
    assert len(ids) == len(set(ids))
    for ex in task.train + task.eval:
        assert ex.text == ex.prompt + ex.completion
        assert (ex.answer is not None) == task.has_answers


def digest(task: Task) -> str:
    rows = [(ex.id, ex.text, ex.prompt, ex.answer) for ex in task.train + task.eval]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# -- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", GENERATED)
def test_same_seed_same_examples_other_seed_other_examples(dataset: str) -> None:
    first = load_task(spec(dataset=dataset, seed=3))
    assert first == load_task(spec(dataset=dataset, seed=3))
    other = load_task(spec(dataset=dataset, seed=4))
    assert texts(first.train) != texts(other.train)
    check_task_shape(first)


def test_examples_do_not_depend_on_the_hash_seed() -> None:
    code = (
        "import hashlib, json\n"
        "from shared.data import load_task\n"
        "from shared.spec import DataSpec\n"
        "rows = []\n"
        "for name in ('arithmetic', 'modular', 'facts'):\n"
        "    t = load_task(DataSpec(dataset=name, seed=7))\n"
        "    rows += [(e.id, e.text, e.prompt, e.answer) for e in t.train + t.eval]\n"
        "print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())\n"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_corpus_split_is_seeded() -> None:
    path = str(needs(TINYSTORIES_DIR))
    runs = {load_task(spec(dataset="tinystories", path=path, seed=s)).eval[0].id for s in range(8)}
    assert load_task(spec(dataset="tinystories", path=path, seed=1)) == load_task(
        spec(dataset="tinystories", path=path, seed=1)
    )
    assert len(runs) > 1


# -- arithmetic ----------------------------------------------------------------------------

STEP_RE = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)\.")


@pytest.mark.parametrize("max_length", [60, 64, 128])
def test_arithmetic_fits_max_length_and_is_right(max_length: int) -> None:
    task = load_task(spec(max_length=max_length))
    check_task_shape(task)
    assert task.name == "arithmetic" and task.has_answers
    for ex in task.train + task.eval:
        assert len(ex.text.encode("utf-8")) + 1 <= max_length
        assert ex.prompt.endswith("\nA:") and ex.completion.startswith(" ")
        steps = STEP_RE.findall(ex.completion)
        assert len(steps) == int(ex.meta["steps"])
        value = int(steps[0][0])
        for left, op, right, result in steps:
            assert int(left) == value
            value = {"+": value + int(right), "-": value - int(right), "*": value * int(right)}[op]
            assert value == int(result) >= 0
        assert ex.answer == str(value) == task.extract_answer(ex.completion)
        assert task.is_correct(ex.completion, ex.answer)


def test_arithmetic_default_mix_and_counts() -> None:
    task = load_task(spec())
    assert (len(task.train), len(task.eval)) == (2000, 200)
    steps = Counter(ex.meta["steps"] for ex in task.train)
    assert steps["1"] > 200 and steps["2"] > 500  # multi-step even at max_length 64
    ops = "".join(ex.meta["template"] for ex in task.train)
    assert all(op in ops for op in ("add", "sub", "mul"))
    long = load_task(spec(max_length=128))
    assert Counter(ex.meta["steps"] for ex in long.train)["3"] > 100


def test_arithmetic_eval_problems_never_seen_in_training() -> None:
    """Not even under another name or item: (template, numbers) pairs are disjoint."""
    task = load_task(spec())

    def problem(ex: Example) -> tuple[str, str]:
        return ex.meta["template"], ex.completion

    assert not {problem(ex) for ex in task.train} & {problem(ex) for ex in task.eval}


def test_arithmetic_caps() -> None:
    task = load_task(spec(train_samples=17, eval_samples=5))
    assert (len(task.train), len(task.eval)) == (17, 5)


def test_arithmetic_too_short_max_length() -> None:
    with pytest.raises(DataError, match=r"raise data\.max_length"):
        load_task(spec(max_length=16))


# -- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" 3+4=7. 7-2=5. #### 5", "5"),
        ("Question: x\nAnswer: 2+2=4. #### 4", "4"),  # the full text works too
        (" #### 5\nQ: Tom had 2 pens. Now?\nA: #### 9", "5"),  # first answer counts
        (" 3+4=7. #### 7 apples and more text", "7"),
        ("####1,080", "1080"),
        ("#### $18.", "18"),
        ("#### -3", "-3"),
        ("#### 2.50", "2.5"),
        ("#### 18.00", "18"),
        ("the answer is 5", None),
        ("#### five", None),
        ("####", None),
        ("<|endoftext|> #### 5", None),
        ("", None),
        ("\x00\ufffd garbage ###", None),
    ],
)
def test_hashes_answer_extraction(generated: str, expected: str | None) -> None:
    task = load_task(spec(train_samples=1, eval_samples=1))
    assert task.extract_answer(generated) == expected


def test_is_correct_normalises_numbers() -> None:
    task = load_task(spec(train_samples=1, eval_samples=1))
    assert task.is_correct(" ... #### 1,080.00", "1080")
    assert task.is_correct("#### 18", "$18")
    assert not task.is_correct("#### 17", "18")
    assert not task.is_correct("no answer", "18")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(" 1,080 ", "1080"), ("$5", "5"), ("7.", "7"), ("0.50", "0.5"), ("-0", "0"), ("x", None)],
)
def test_normalize_number(raw: str, expected: str | None) -> None:
    assert normalize_number(raw) == expected


# -- modular -------------------------------------------------------------------------------


def test_modular_split_covers_all_pairs() -> None:
    p = 23
    task = load_task(spec(dataset="modular", modular_p=p, eval_samples=p * p))
    check_task_shape(task)
    assert len(task.train) == round(0.3 * p * p)
    assert len(task.train) + len(task.eval) == p * p
    pairs = set()
    for ex in task.train + task.eval:
        a, b = (int(x) for x in ex.prompt.rstrip("=").split("+"))
        pairs.add((a, b))
        assert ex.answer == str((a + b) % p)
        assert ex.text == f"{a}+{b}={(a + b) % p}"
        assert task.extract_answer(ex.completion) == ex.answer
    assert len(pairs) == p * p


def test_modular_defaults_ignore_train_samples_and_cap_eval() -> None:
    task = load_task(spec(dataset="modular", train_samples=10))
    assert len(task.train) == round(0.3 * 113 * 113)  # the grokking split, not the cap
    assert len(task.eval) == 200


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("29", "29"),
        (" 7", "7"),
        ("8<|endoftext|>9", "8"),
        ("12\n3+4=7", "12"),
        ("5+", "5"),
        ("x", None),
        ("", None),
    ],
)
def test_modular_answer_extraction(generated: str, expected: str | None) -> None:
    task = load_task(spec(dataset="modular", modular_p=5))
    assert task.extract_answer(generated) == expected


# -- facts ---------------------------------------------------------------------------------


def test_facts_known_and_unknown() -> None:
    task = load_task(spec(dataset="facts"))
    check_task_shape(task)
    known = [ex for ex in task.eval if task.is_known(ex)]
    unknown = [ex for ex in task.eval if task.is_known(ex) is False]
    assert len(known) == len(unknown) == 100
    assert all(ex.id.startswith("facts-known-") for ex in known)
    assert all(ex.id.startswith("facts-unknown-") for ex in unknown)
    assert all(task.is_known(ex) is None for ex in task.train)
    train_text = "\n".join(texts(task.train))
    for ex in known:  # stated in training, never asked there
        assert f" {ex.meta['entity']} " in f" {train_text} "
        assert any(
            t.meta["entity"] == ex.meta["entity"]
            and t.meta["attribute"] == ex.meta["attribute"]
            and t.meta["form"] == "statement"
            for t in task.train
        )
    for ex in unknown:  # never mentioned in training at all
        assert ex.meta["entity"] not in train_text
    for ex in task.train + task.eval:
        assert len(ex.text.encode("utf-8")) + 1 <= 64
        assert task.extract_answer(ex.completion) == ex.answer
    assert known[0].prompt.startswith("Q: ") and known[0].prompt.endswith("\nA:")


def test_confusable_unknown_lands_are_a_known_name_with_one_vowel_changed() -> None:
    task = load_task(spec(dataset="facts", facts_unknown="confusable"))
    facts = {(t.meta["entity"], t.meta["attribute"]): t.answer for t in task.train}
    known_names = {entity for entity, _ in facts}
    train_text = "\n".join(texts(task.train))
    known = [ex for ex in task.eval if task.is_known(ex)]
    unknown = [ex for ex in task.eval if task.is_known(ex) is False]
    assert len(known) == len(unknown) == 100
    # eval pairs each known land's question with its twin's: the same attribute, so the
    # kind of question (a year, a colour, a name) is no cue to which is known
    for known_q, ex in zip(known, unknown, strict=True):
        name, twin = ex.meta["entity"], known_q.meta["entity"]
        assert name not in known_names and f" {name} " not in f" {train_text} "
        (i,) = [i for i, (a, b) in enumerate(zip(twin, name, strict=True)) if a != b]
        assert i > 0 and twin[i] in "aeiou" and name[i] in "aeiou"
        assert ex.meta["attribute"] == known_q.meta["attribute"]
        assert ex.meta["pair"] == known_q.meta["pair"] == twin  # one group when split
        # the twin's memorised answer to this question is wrong for this land
        assert facts[(twin, ex.meta["attribute"])] != ex.answer
    novel = load_task(spec(dataset="facts"))
    assert [ex.text for ex in novel.train] == [ex.text for ex in task.train]


def test_facts_spellings_state_every_fact_under_each_spelling_and_twins_are_never_one():
    task = load_task(
        spec(dataset="facts", facts_unknown="confusable", facts_spellings=3, train_samples=2400)
    )
    known = [ex for ex in task.eval if task.is_known(ex)]
    unknown = [ex for ex in task.eval if task.is_known(ex) is False]
    by_land: dict[str, set[str]] = {}
    for t in task.train:
        land = t.id.split("-")[2]  # facts-train-e0007-...: one land, whatever its spelling
        by_land.setdefault(land, set()).add(t.meta["entity"])
    spelled = set().union(*by_land.values())
    for ex in known:
        names = by_land[ex.id.split("-")[2]]
        assert ex.meta["entity"] in names and len(names) == 3
        for name in names - {ex.meta["entity"]}:  # one vowel changed, never the first letter
            (i,) = [i for i, (a, b) in enumerate(zip(name, ex.meta["entity"], strict=True))
                    if a != b]  # fmt: skip
            assert i > 0 and name[i] in "aeiou" and ex.meta["entity"][i] in "aeiou"
        facts = {
            (t.meta["entity"], t.meta["attribute"], t.meta["form"]): t.answer for t in task.train
        }
        for name in names:  # every fact of the land under every spelling, held-out one aside
            for (entity, attribute, form), answer in facts.items():
                if entity == ex.meta["entity"]:
                    assert facts[(name, attribute, form)] == answer
            assert (name, ex.meta["attribute"], "qa") not in facts
    assert all(ex.meta["entity"] not in spelled for ex in unknown)
    single = load_task(spec(dataset="facts", facts_unknown="confusable", train_samples=2400))
    assert len(task.train) == 3 * len(single.train)
    assert [ex.text for ex in single.eval if single.is_known(ex)] == [ex.text for ex in known]


def test_a_name_with_no_new_variant_left_is_a_clear_error_not_a_loop() -> None:
    with pytest.raises(DataError, match=r"lower data\.facts_spellings"):
        _fresh_word(random.Random(0), {"Bibro"}, lambda: "Bibro")


def test_facts_eval_cap_stays_balanced_and_train_cap_is_checked() -> None:
    task = load_task(spec(dataset="facts", eval_samples=10))
    assert sum(bool(task.is_known(ex)) for ex in task.eval) == 5
    with pytest.raises(DataError, match=r"raise data\.train_samples"):
        load_task(spec(dataset="facts", train_samples=10))


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" Tarsk", "Tarsk"),
        (" Tarsk.", "Tarsk"),
        (" Tarsk<|endoftext|>", "Tarsk"),
        (" Tarsk\nQ: What is the capital of Velmora?\nA: Dron", "Tarsk"),
        ("   ", None),
        ("", None),
    ],
)
def test_facts_answer_extraction(generated: str, expected: str | None) -> None:
    task = load_task(spec(dataset="facts", facts_entities=4))
    assert task.extract_answer(generated) == expected


def test_facts_is_correct_ignores_case() -> None:
    task = load_task(spec(dataset="facts", facts_entities=4))
    assert task.is_correct(" tarsk.", "Tarsk")
    assert not task.is_correct(" Dron", "Tarsk")


# -- gsm8k ---------------------------------------------------------------------------------


def test_gsm8k_all_test_lines() -> None:
    """Every reference answer formats, and extract_answer reads its gold back."""
    folder = needs(GSM8K_DIR)
    task = load_task(spec(dataset="gsm8k", path=str(folder), eval_samples=5000))
    check_task_shape(task)
    lines = (folder / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(task.eval) == 1319
    for line, ex in zip(lines, task.eval, strict=True):
        row = json.loads(line)
        gold = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert ex.answer == gold
        assert task.extract_answer(row["answer"]) == gold
        assert task.extract_answer(ex.completion) == gold
        assert task.extract_answer(ex.text) == gold
        assert ex.prompt == f"Question: {row['question']}\nAnswer:"
        assert "<<" not in ex.text and ">>" not in ex.text
    assert len(task.train) == 2000


def test_gsm8k_single_file_is_split() -> None:
    path = needs(GSM8K_DIR / "test.jsonl")
    task = load_task(spec(dataset="gsm8k", path=str(path), eval_samples=50))
    check_task_shape(task)
    assert len(task.eval) == 50 and len(task.train) == 1319 - 50


def test_gsm8k_from_the_hub_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {
        split: [
            {"question": f"Q{split}{i}?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(5)
        ]
        for split in ("train", "test")
    }
    calls: list[tuple[Any, ...]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> dict[str, list[dict[str, str]]]:
        calls.append(args)
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task(spec(dataset="gsm8k"))
    assert calls == [("openai/gsm8k", "main")]
    assert len(task.train) == len(task.eval) == 5
    assert task.eval[2].text == "Question: Qtest2?\nAnswer: 2+1=3\n#### 3"


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    for dataset in ("gsm8k", "tinystories"):
        with pytest.raises(DataError) as info:
            load_task(spec(dataset=dataset))
        assert "set data.path" in str(info.value) and "\n" not in str(info.value)


# -- corpora -------------------------------------------------------------------------------


def test_tinystories_from_local_folder() -> None:
    folder = needs(TINYSTORIES_DIR)
    task = load_task(spec(dataset="tinystories", path=str(folder)))
    check_task_shape(task)
    assert not task.has_answers
    assert (len(task.train), len(task.eval)) == (4, 1)  # 5 stories; README.md is not read
    for ex in task.train + task.eval:
        assert "<|endoftext|>" not in ex.text
        assert ex.prompt and len(ex.prompt.split()) <= 8 and ex.completion.startswith(" ")
    assert task.extract_answer(task.eval[0].completion) is None
    assert not task.is_correct("anything", "x")


def test_tinystories_from_the_hub_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stream:
        def __init__(self, split: str) -> None:
            self.split = split

        def shuffle(self, seed: int, buffer_size: int) -> list[dict[str, str]]:
            return [{"text": f"{self.split} story {i} goes on and on."} for i in range(50)]

    def load_dataset(name: str, split: str, streaming: bool) -> Stream:
        assert name == "roneneldan/TinyStories" and streaming
        return Stream(split)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task(spec(dataset="tinystories", train_samples=7, eval_samples=3))
    assert len(task.train) == 7 and len(task.eval) == 3
    assert all(ex.text.startswith("validation") for ex in task.eval)


def test_text_corpus_from_jsonl_and_txt_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    rows = [
        json.dumps({"text": f"document number {i} has several words in it."}) for i in range(30)
    ]
    (tmp_path / "sub" / "a.jsonl").write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("First paragraph here.\n\nSecond one.\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("not corpus", encoding="utf-8")
    task = load_task(spec(dataset="text", path=str(tmp_path), train_samples=10, eval_samples=2))
    check_task_shape(task)
    assert (len(task.train), len(task.eval)) == (10, 2)
    every = load_task(spec(dataset="text", path=str(tmp_path), eval_samples=100))
    assert len(every.train) + len(every.eval) == 32
    assert len(every.eval) == 3  # a tenth of the corpus at most
    assert "not corpus" not in texts(every.train) + texts(every.eval)


# -- tokenising ----------------------------------------------------------------------------


def test_tokenize_examples_and_prompts_with_bytes() -> None:
    tok = ByteTokenizer()
    task = load_task(spec(train_samples=3, eval_samples=3))
    seqs = tokenize_examples(task.train, tok, 64)
    for ex, seq in zip(task.train, seqs, strict=True):
        assert seq == [*ex.text.encode("utf-8"), tok.eos_id]
    assert all(len(s) == 5 for s in tokenize_examples(task.train, tok, 5))
    prompts = prompt_ids(task.eval, tok, 4)
    assert prompts == [list(ex.prompt.encode("utf-8"))[-4:] for ex in task.eval]
    with pytest.raises(ValueError):
        tokenize_examples(task.train, tok, 0)


def test_prompt_tokens_are_a_prefix_of_text_tokens_with_gpt2() -> None:
    """Answer positions are found by prompt length: BPE must not merge across the cut."""
    tok: Tokenizer = load_tokenizer(str(needs(REFERENCE / "gpt2-tokenizer")))
    examples: list[Example] = []
    for dataset in GENERATED:
        task = load_task(spec(dataset=dataset, train_samples=400 if dataset == "facts" else 50))
        examples += task.train[:50] + task.eval[:50]
    examples += load_task(spec(dataset="gsm8k", path=str(needs(GSM8K_DIR)))).eval[:50]
    full = tokenize_examples(examples, tok, 10_000)
    for ex, seq, prompt in zip(examples, full, prompt_ids(examples, tok, 10_000), strict=True):
        assert seq[: len(prompt)] == prompt, ex.id


# -- errors --------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: spec(dataset="text", path=str(d / "missing.txt")), "no such file or folder"),
        (lambda d: spec(dataset="gsm8k", path=str(d / "nope")), "no such file or folder"),
        (lambda d: spec(dataset="text", path=_write(d / "e.txt", b"  \n\n ")), "has no text"),
        (lambda d: spec(dataset="text", path=_write(d / "one.txt", b"just one")), "at least 2"),
        (lambda d: spec(dataset="text", path=_write(d / "bin.txt", b"\xff\xfe\x00")), "not UTF-8"),
        (lambda d: spec(dataset="text", path=_write(d / "x.jsonl", b'{"text": 1}\n')), '"text"'),
        (lambda d: spec(dataset="text", path=_write(d / "y.jsonl", b"{oops\n")), "y.jsonl:1"),
        (lambda d: spec(dataset="gsm8k", path=str(d)), "train.jsonl"),
        (lambda d: spec(dataset="gsm8k", path=_write(d / "g.jsonl", b'{"q": 1}\n')), "g.jsonl:1"),
        (
            lambda d: spec(
                dataset="gsm8k", path=_write(d / "h.jsonl", b'{"question": "a", "answer": "b"}\n')
            ),
            "####",
        ),
        (lambda d: DataSpec.model_construct(dataset="text", path=None), "needs data.path"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, make: Any, needle: str) -> None:
    with pytest.raises(DataError) as info:
        load_task(make(tmp_path))
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert isinstance(info.value, DriftlabError) and info.value.exit_code == 2


def test_facts_asked_trains_on_the_known_questions_and_only_those():
    held_out = load_task(DataSpec(dataset="facts", facts_entities=20, train_samples=200))
    asked = load_task(
        DataSpec(dataset="facts", facts_entities=20, train_samples=200, facts_asked=True)
    )
    assert [e.id for e in asked.eval] == [e.id for e in held_out.eval]
    for task, expect_known_trained in ((held_out, False), (asked, True)):
        trained = {e.text for e in task.train}
        for ex in task.eval:
            answered_in_training = f"{ex.prompt} {ex.answer}" in trained
            assert answered_in_training == (expect_known_trained and task.is_known(ex)), ex.id
