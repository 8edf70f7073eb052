"""Tokenizers: the offline byte and numbers tokenizers, GPT-2 BPE from local files, and their errors.

The GPT-2 files are read from the reference data beside the checkout (never copied into
the project); the hub is never contacted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.data import DataError
from shared.errors import DriftlabError
from shared.tokenizer import (
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    NUMBER_LIMIT,
    ByteTokenizer,
    HFTokenizer,
    NumberTokenizer,
    Tokenizer,
    load_tokenizer,
)
from tests.support import REFERENCE

GPT2_DIR = REFERENCE / "gpt2-tokenizer"
MIXED = "Hello world! Grüße, naïve café — 東京 🚀\n\ttabs  and  spaces <x>"


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    if not GPT2_DIR.is_dir():
        pytest.fail(f"reference GPT-2 tokenizer files not found at {GPT2_DIR} (../shared/data)")
    return load_tokenizer(str(GPT2_DIR))


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.pad_id) == ("byte", 258, 256, 257)
    ids = tok.encode(MIXED)
    assert ids == list(MIXED.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == MIXED
    assert tok.encode_batch([MIXED, "", "a"]) == [ids, [], [97]]


def test_byte_decode_never_fails() -> None:
    tok = ByteTokenizer()
    assert tok.decode([104, 105, BYTE_EOS_ID]) == "hi<|endoftext|>"
    assert tok.decode([BYTE_PAD_ID, 104]) == "<|pad|>h"
    # A cut UTF-8 sequence (first byte of "é") and an id beyond the vocabulary.
    assert tok.decode([104, 0xC3]) == "h\ufffd"
    assert tok.decode([104, 9999, 105]) == "h\ufffdi"


def test_byte_save_and_reload(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(again, ByteTokenizer)
    assert again.encode(MIXED) == ByteTokenizer().encode(MIXED)
    assert again.name == str(tmp_path / "tok")


def test_numbers_tokenizer_gives_whole_numbers_one_token_and_round_trips() -> None:
    tok = load_tokenizer("numbers")
    assert isinstance(tok, NumberTokenizer) and tok.vocab_size == 258 + NUMBER_LIMIT
    number = 258
    # The modular task's a+b=c is five tokens: operand, '+', operand, '=', answer.
    assert tok.encode("12+101=0") == [number + 12, ord("+"), number + 101, ord("="), number]
    # Leading zeros and numbers past the limit stay bytes, so nothing is lost.
    for text in ("007", "x1000y", "999 1000", MIXED, "3.14", ""):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("007") == list(b"007") and tok.encode("1000") == list(b"1000")
    assert tok.encode("999") == [number + 999]
    assert tok.decode([number + 42, BYTE_EOS_ID, 104]) == "42<|endoftext|>h"
    assert tok.decode([number + NUMBER_LIMIT]) == "\ufffd"  # beyond the vocabulary


def test_numbers_save_and_reload(tmp_path: Path) -> None:
    NumberTokenizer().save(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(again, NumberTokenizer) and again.encode("7+8=") == [265, 43, 266, 61]


def test_gpt2_from_local_files(gpt2: Tokenizer) -> None:
    assert isinstance(gpt2, HFTokenizer)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.pad_id) == (50257, 50256, 50256)
    ids = gpt2.encode(MIXED)
    assert gpt2.decode(ids) == MIXED
    assert gpt2.decode([*gpt2.encode("Hi"), gpt2.eos_id]) == "Hi<|endoftext|>"


def test_gpt2_batch_matches_single(gpt2: Tokenizer) -> None:
    texts = ["Hello world", MIXED, "", " 3+4=7. #### 7"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode_batch([]) == []


def test_gpt2_save_and_reload(gpt2: Tokenizer, tmp_path: Path) -> None:
    gpt2.save(tmp_path / "saved")
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.encode(MIXED) == gpt2.encode(MIXED)
    assert (again.vocab_size, again.eos_id) == (gpt2.vocab_size, gpt2.eos_id)


def test_empty_vocabulary_is_refused(tmp_path: Path) -> None:
    """What transformers 5 builds from ignored vocab_file=/merges_file= must never train."""
    (tmp_path / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected at least 256"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("gtp2", "no such folder"),
        ("./no/such/folder", "no such folder"),
    ],
)
def test_unknown_tokenizer_is_one_line(name: str, needle: str) -> None:
    with pytest.raises(DataError) as info:
        load_tokenizer(name)
    message = str(info.value)
    assert needle in message and name in message
    assert "\n" not in message
    assert isinstance(info.value, DriftlabError) and info.value.exit_code == 2


def test_folder_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here", encoding="utf-8")
    with pytest.raises(DataError, match=r"neither vocab\.json"):
        load_tokenizer(str(tmp_path))


def test_broken_tokenizer_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_tokenizer(str(tmp_path))
    assert "could not load" in str(info.value)
    assert "\n" not in str(info.value)
