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

Where things live: `data_examples` (Example, Task, answer reading, seeded sampling),
`data_generated` (arithmetic, modular, facts), `data_files` (gsm8k, tinystories, text),
`data_tokens` (examples as token ids). This module picks the loader and re-exports what
the rest of driftlab imports from `shared.data`.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.data_examples import Example, Task, normalize_number
from shared.data_files import gsm8k_example, load_gsm8k, load_text, load_tinystories
from shared.data_generated import load_arithmetic, load_facts, load_modular
from shared.data_tokens import answer_starts, prompt_ids, tokenize_examples
from shared.errors import DataError, error_summary
from shared.spec import DataSpec

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


#: data.dataset -> loader. Every name DataSpec allows is here.
DATASETS: dict[str, Callable[[DataSpec], Task]] = {
    "arithmetic": load_arithmetic,
    "modular": load_modular,
    "facts": load_facts,
    "gsm8k": load_gsm8k,
    "tinystories": load_tinystories,
    "text": load_text,
}
