"""Datasets read from files or the Hugging Face hub: gsm8k, tinystories and text.

They read local files when `data.path` is set and the hub otherwise; every failure (no
such path, a file that is not UTF-8 or not JSON lines, no hub) is one `DataError` line
that names the file and what to do.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from shared.data_examples import (
    DOC_SEPARATOR,
    HASHES_RE,
    Example,
    Task,
    normalize_number,
    sample_indices,
    seeded_rng,
)
from shared.errors import DataError, error_summary
from shared.spec import DataSpec

__all__ = [
    "gsm8k_example",
    "load_gsm8k",
    "load_text",
    "load_tinystories",
]

GSM8K_HUB_NAME = "openai/gsm8k"
TINYSTORIES_HUB_NAME = "roneneldan/TinyStories"
#: What a corpus folder is read for (README.md or LICENSE beside the data are not corpus).
_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl",)
#: Corpus documents held out for eval: at most this share (at least one document).
_EVAL_SHARE = 10
#: Words of a corpus document given as its prompt (plain text has no question to ask).
_CORPUS_PROMPT_WORDS = 8
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


# -- gsm8k ---------------------------------------------------------------------------------


def gsm8k_example(question: str, answer: str, example_id: str) -> Example:
    """`Question: {q}\\nAnswer: {a}` with GSM8K's calculator annotations `<<...>>` removed.

    The annotations are tool calls for GSM8K's calculator, not text a model should
    learn to write; the answer otherwise keeps its reasoning lines and `#### N` ending.
    """
    prompt = f"Question: {question}\nAnswer:"
    completion = _CALCULATOR_RE.sub("", answer)
    match = HASHES_RE.search(completion)
    gold = normalize_number(match.group(1)) if match else None
    if gold is None:
        raise DataError(
            f"gsm8k example {example_id}: the answer has no '#### <number>' line; "
            "is this GSM8K data?"
        )
    return Example(text=f"{prompt} {completion}", prompt=prompt, answer=gold, id=example_id)


def load_gsm8k(spec: DataSpec) -> Task:
    """GSM8K: the train split (capped, seeded) to train on, the test split to score on.

    `data.path` is a folder with train.jsonl + test.jsonl, or one .jsonl file whose
    seeded held-out slice becomes eval; without it, `openai/gsm8k` (config main) is
    loaded from the hub.
    """
    rng = seeded_rng("gsm8k", spec.seed)
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
    train = [train_rows[i] for i in sample_indices(len(train_rows), spec.train_samples, rng)]
    evals = [eval_rows[i] for i in sample_indices(len(eval_rows), spec.eval_samples, rng)]
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
    rng = seeded_rng(name, spec.seed)
    eval_idx = _held_out(len(documents), spec.eval_samples, rng, path)
    held = set(eval_idx)
    rest = [i for i in range(len(documents)) if i not in held]
    train_idx = [rest[i] for i in sample_indices(len(rest), spec.train_samples, rng)]
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
    return sample_indices(n, min(eval_samples, max(1, n // _EVAL_SHARE)), rng)


def load_tinystories(spec: DataSpec) -> Task:
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


def load_text(spec: DataSpec) -> Task:
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
