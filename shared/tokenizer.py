"""Tokenizers: one small interface over a built-in byte tokenizer and Hugging Face BPE.

Why it is built this way:

- `byte` needs no files and no network, so the tiny CPU run, the tests and a cluster pod
  without hub access all work out of the box: ids 0..255 are UTF-8 bytes, 256 is
  `<|endoftext|>` and 257 `<|pad|>`.
- `numbers` is `byte` plus one token per whole number 0..999, so `a+b=c` of the modular
  task is five tokens with a one-token answer, as in the grokking papers; a byte-level
  answer is several digits predicted in turn, a different (and slower to grok) task.
- `gpt2` (or a local folder) wraps a Hugging Face fast tokenizer; the rest of driftlab only
  sees `encode`/`decode`/`encode_batch` and the special ids, never a transformers object.
- transformers 5.x silently builds an *empty* GPT-2 tokenizer when handed the old
  `vocab_file=`/`merges_file=` arguments; every Hugging Face load here is checked for a
  plausible vocabulary, so such a tokenizer can never train a model that learns nothing.
- `Tokenizer.name` is what `load_tokenizer` was given, so a stage can rebuild the same
  tokenizer from the run spec; `save(folder)` writes files that `load_tokenizer(folder)`
  reads back without the hub (for stages on pods that cannot reach it).
"""

from __future__ import annotations

import json
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import DataError, error_summary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BYTE_EOS_ID",
    "BYTE_PAD_ID",
    "ByteTokenizer",
    "HFTokenizer",
    "NumberTokenizer",
    "Tokenizer",
    "load_tokenizer",
]

BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
EOS_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"
#: Written by `ByteTokenizer.save`, so `load_tokenizer(folder)` knows the folder holds one.
BYTE_MARKER_FILE = "driftlab_tokenizer.json"
#: `numbers` has one token for each whole number below this, after the byte ids.
NUMBER_LIMIT = 1000
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"0|[1-9][0-9]*")
#: The Hugging Face hub name `load_tokenizer("gpt2")` loads.
GPT2_HUB_NAME = "gpt2"
#: Fewer entries than this from `gpt2` means the load went wrong (the real one has 50257).
GPT2_MIN_VOCAB = 1000
#: A byte-level BPE holds at least the 256 byte symbols; fewer means a broken load.
MIN_VOCAB = 256


class Tokenizer(ABC):
    """Text <-> token ids, with the special ids the trainer and the generators need.

    `eos_id` ends every training sequence and stops generation; `pad_id` fills batches
    (the trainer masks it out of the loss). `vocab_size` counts every id `encode` can
    return, special ones included: it sizes the model's embedding.
    """

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids are written out (`<|endoftext|>`), never dropped."""

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` of each text; subclasses override it when they have a faster path."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def save(self, folder: str | Path) -> None:
        """Write this tokenizer into `folder` so that `load_tokenizer(folder)` rebuilds it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: no files, no training, and every string is representable."""

    #: What `save` writes in the marker file, so `load_tokenizer(folder)` rebuilds this class.
    kind = "byte"

    def __init__(self, name: str = "byte") -> None:
        self.name = name
        self.vocab_size = 258
        self.eos_id = BYTE_EOS_ID
        self.pad_id = BYTE_PAD_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes decoded with errors="replace": a model may emit a broken UTF-8 sequence.

        Ids outside the vocabulary (a model whose embedding is larger than 258) become
        U+FFFD as well, so decoding a generation never fails.
        """
        parts: list[str] = []
        run = bytearray()
        for token in ids:
            if 0 <= token < 256:
                run.append(token)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(
                EOS_TEXT if token == BYTE_EOS_ID else PAD_TEXT if token == BYTE_PAD_ID else "\ufffd"
            )
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, folder: str | Path) -> None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        marker = json.dumps({"type": self.kind}) + "\n"
        (out / BYTE_MARKER_FILE).write_text(marker, encoding="utf-8")


class NumberTokenizer(ByteTokenizer):
    """Bytes, plus one id per whole number 0..NUMBER_LIMIT-1 (ids 258 and up).

    A digit run becomes one token only when it is a number written the usual way (no
    leading zero) and below the limit; any other digits stay bytes, so every string still
    encodes and `decode(encode(text)) == text`.
    """

    kind = "numbers"

    def __init__(self, name: str = "numbers") -> None:
        super().__init__(name)
        self.vocab_size = BYTE_PAD_ID + 1 + NUMBER_LIMIT

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in _DIGITS.finditer(text):
            digits = match.group()
            if _NUMBER.fullmatch(digits) and int(digits) < NUMBER_LIMIT:
                ids += super().encode(text[start : match.start()])
                ids.append(BYTE_PAD_ID + 1 + int(digits))
                start = match.end()
        return ids + super().encode(text[start:])

    def decode(self, ids: Sequence[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            number = token - BYTE_PAD_ID - 1
            if 0 <= number < NUMBER_LIMIT:
                parts += [super().decode(run), str(number)]
                run = []
            else:
                run.append(token)
        parts.append(super().decode(run))
        return "".join(parts)


class HFTokenizer(Tokenizer):
    """A Hugging Face (fast) tokenizer behind the driftlab interface."""

    def __init__(self, name: str, hf: PreTrainedTokenizerBase) -> None:
        eos = hf.eos_token_id
        if eos is None:
            raise DataError(
                f"tokenizer {name}: has no end-of-text token; driftlab needs one to end "
                "sequences (use a GPT-2 style tokenizer with <|endoftext|>)"
            )
        # Sequences are cut to data.max_length by driftlab itself; the library's own limit
        # (1024 for gpt2) would only print warnings while a long document is encoded.
        hf.model_max_length = sys.maxsize
        self.name = name
        self._hf = hf
        self.vocab_size = len(hf)
        self.eos_id = int(eos)
        pad = hf.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._hf(text, add_special_tokens=False)["input_ids"]
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """One call into the Rust tokenizer for the whole batch (parallel, much faster)."""
        batch = list(texts)
        if not batch:
            return []
        ids: list[list[int]] = self._hf(batch, add_special_tokens=False)["input_ids"]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Exact inverse of `encode`: no clean-up of spaces before punctuation."""
        text = self._hf.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)  # a list of ids decodes to one string
        return text

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._hf.save_pretrained(str(folder))


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer `data.tokenizer` names: `byte`, `numbers`, `gpt2` (hub) or a folder.

    A folder may hold what `Tokenizer.save` wrote, a saved Hugging Face tokenizer
    (tokenizer.json / tokenizer_config.json), or GPT-2's vocab.json + merges.txt.
    Anything else ends in a one-line `DataError` saying what to do.
    """
    if name == "byte":
        return ByteTokenizer()
    if name == "numbers":
        return NumberTokenizer()
    if name == "gpt2":
        return _checked(name, _hf_load(name, GPT2_HUB_NAME, hub=True), GPT2_MIN_VOCAB)
    folder = Path(name).expanduser().resolve()  # absolute: never mistaken for a hub id
    if not folder.is_dir():
        raise DataError(
            f"tokenizer {name}: no such folder; data.tokenizer must be byte, gpt2 or a folder "
            "with vocab.json + merges.txt (or a saved Hugging Face tokenizer)"
        )
    if (folder / BYTE_MARKER_FILE).is_file():
        kind = json.loads((folder / BYTE_MARKER_FILE).read_text(encoding="utf-8")).get("type")
        return NumberTokenizer(name) if kind == "numbers" else ByteTokenizer(name)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return _checked(name, _hf_load(name, str(folder)), MIN_VOCAB)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # Never GPT2TokenizerFast(vocab_file=..., merges_file=...): empty under transformers 5.
        return _checked(name, _hf_load(name, str(folder), tokenizer_type="gpt2"), MIN_VOCAB)
    raise DataError(
        f"tokenizer {name}: the folder has neither vocab.json + merges.txt nor a saved "
        "Hugging Face tokenizer (tokenizer.json); add them or use data.tokenizer: byte"
    )


def _hf_load(
    name: str, source: str, *, hub: bool = False, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(source)` with any failure as one line that says what to do."""
    from transformers import AutoTokenizer

    try:
        loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as err:  # network, cache, malformed files: one line for the user
        where = "the Hugging Face hub" if hub else "its files"
        fix = (
            "connect to the hub or set data.tokenizer to a folder with vocab.json + merges.txt"
            if hub
            else "check vocab.json/merges.txt or re-save the tokenizer with save_pretrained"
        )
        raise DataError(
            f"tokenizer {name}: could not load it from {where} ({error_summary(err)}); {fix}"
        ) from None
    return loaded


def _checked(name: str, hf: PreTrainedTokenizerBase, min_vocab: int) -> HFTokenizer:
    if len(hf) < min_vocab:
        raise DataError(
            f"tokenizer {name}: loaded with only {len(hf)} token(s), expected at least "
            f"{min_vocab}; the tokenizer files are empty or were not read (transformers 5 "
            "ignores vocab_file=/merges_file=)"
        )
    return HFTokenizer(name, hf)
