"""One layer's activations, made by running a checkpoint over token sequences.

This is what lets an SAE train on the run's training data rather than on the few thousand
probe tokens the extractor stores: the training sequences go through the model in
forward passes of at most `FORWARD_TOKENS` padded tokens, and a hook at the SAE's layer
(0: after the embeddings, l: after block l, before ln_f, as the extractor stores it) keeps
the hidden states of the real tokens and stops the forward pass right there, so the blocks
above, the final norm and the language-model head are never computed.

Sequences are right-padded and attention is causal, so padding never reaches a real token;
the attention mask is passed anyway, exactly as the extractor does. On a GPU the token ids
and the kept positions are copied from pinned memory without waiting, so the host can run
ahead of the device. Imports torch only (the benchmark uses it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from services.sae.metrics import hidden_site

#: Padded tokens per forward pass: large enough that per-call overhead does not dominate
#: a small model, small enough that a GPT-2-sized block's activations stay modest.
FORWARD_TOKENS = 8192


@dataclass(frozen=True)
class Sequences:
    """Token sequences in one tensor: `ids` [n, longest], padded beyond `lengths`."""

    ids: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def pad(cls, seqs: Sequence[Sequence[int]], pad_id: int) -> Sequences:
        if not seqs or min(len(s) for s in seqs) == 0:
            raise ValueError("no sequences, or an empty one: nothing to run the model on")
        ids = pad_sequence(
            [torch.tensor(s, dtype=torch.int64) for s in seqs],
            batch_first=True,
            padding_value=pad_id,
        )
        return cls(ids, torch.tensor([len(s) for s in seqs], dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def select(self, index: torch.Tensor) -> Sequences:
        """These sequences, in this order, padded only to the longest of them."""
        lengths = self.lengths[index]
        return Sequences(self.ids[index, : int(lengths.max())], lengths)


def first_tokens(seqs: Sequences, tokens: int, seed: int) -> Sequences:
    """Whole sequences in a seeded random order until they hold `tokens` (all if fewer)."""
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))
    enough = torch.cumsum(seqs.lengths[order], 0) >= tokens
    count = int(enough.to(torch.int8).argmax()) + 1 if bool(enough.any()) else len(seqs)
    return seqs.select(order[:count])


class _Reached(Exception):
    """Raised by the capture hook: the layer is captured, the rest of the model not needed."""


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@torch.no_grad()
def layer_activations(model: nn.Module, layer: int, seqs: Sequences) -> torch.Tensor:
    """[real tokens, d_model] hidden states at layer `layer`, sequence by sequence."""
    device = next(model.parameters()).device
    mask = torch.arange(seqs.ids.shape[1])[None, :] < seqs.lengths[:, None]
    rows, positions = (_to(i, device) for i in mask.nonzero(as_tuple=True))
    kept: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        states = output[0] if isinstance(output, tuple) else output
        kept.append(states[rows, positions])
        raise _Reached

    transformer: Any = getattr(model, "transformer")  # noqa: B009 (HF GPT-2 attribute)
    handle = hidden_site(model, layer).register_forward_hook(hook)
    try:
        transformer(
            input_ids=_to(seqs.ids, device), attention_mask=_to(mask, device), use_cache=False
        )
    except _Reached:
        pass
    finally:
        handle.remove()
    return kept[0]


def generating_model(model: nn.Module, dtype: str) -> nn.Module:
    """`model` itself for float32; else a copy in `dtype` (float32 inputs and judges keep
    the original). The copy's hidden states come back in `dtype` and are scaled to float32
    batch by batch, so the buffer holds half the bytes too."""
    if dtype == "float32":
        return model
    return copy.deepcopy(model).to(getattr(torch, dtype))


def forward_groups(lengths: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive sequences that make one forward pass: as many as fit in
    `FORWARD_TOKENS` once padded to the longest of them, and always at least one."""
    values = lengths.tolist()
    start = 0
    while start < len(values):
        longest, end = values[start], start + 1
        while end < len(values) and (end + 1 - start) * max(longest, values[end]) <= FORWARD_TOKENS:
            longest = max(longest, values[end])
            end += 1
        yield start, end
        start = end


def pass_order(lengths: torch.Tensor, window: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of every sequence, sorted by length within windows of `window`.

    Forward passes then group sequences of about one length, so little is spent on padding
    (a random batch of corpus texts is mostly padding), while each window, a fraction of the
    mixing buffer, still holds a random sample of every kind of sequence.
    """
    order = torch.randperm(len(lengths), generator=generator)
    parts = [order[i : i + window] for i in range(0, len(order), window)]
    return torch.cat([part[torch.argsort(lengths[part], stable=True)] for part in parts])


def chunks(
    model: nn.Module, layer: int, seqs: Sequences, order: torch.Tensor
) -> Iterator[torch.Tensor]:
    """Activations of `seqs` taken in `order`, one forward pass of them at a time."""
    for start, end in forward_groups(seqs.lengths[order]):
        yield layer_activations(model, layer, seqs.select(order[start:end]))


def all_activations(model: nn.Module, layer: int, seqs: Sequences) -> torch.Tensor:
    """[seqs.n_tokens, d_model]: every token's activations, in the sequences' order."""
    return torch.cat(list(chunks(model, layer, seqs, torch.arange(len(seqs)))))


def endless_chunks(
    model: nn.Module, layer: int, seqs: Sequences, window_tokens: int, seed: int
) -> Iterator[torch.Tensor]:
    """Activations of pass after pass over `seqs`, each in a new seeded `pass_order` whose
    windows hold about `window_tokens` tokens."""
    generator = torch.Generator().manual_seed(seed)
    window = max(1, window_tokens * len(seqs) // seqs.n_tokens)
    while True:
        yield from chunks(model, layer, seqs, pass_order(seqs.lengths, window, generator))
