"""Examples as token ids: training sequences, evaluation prompts and where answers start.

The one place that joins datasets and tokenizers; keeping it out of both is what lets
`shared.tokenizer` and the dataset modules never import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.data_examples import Example

if TYPE_CHECKING:
    from shared.tokenizer import Tokenizer

__all__ = ["answer_starts", "prompt_ids", "tokenize_examples"]


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


def _check_max_length(max_length: int) -> None:
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
