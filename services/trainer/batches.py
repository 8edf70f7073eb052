"""Training batches: token sequences of different lengths, padded into tensors.

A full-batch run (grokking: 3831 short sequences per step) made its batches in Python, one
sequence at a time, and that cost more than the step itself on a GPU. `PackedSequences`
keeps the training set in one flat tensor and pads a batch with a few tensor operations.

Both take an optional first target position per sequence (`starts`): with `data.loss_on:
answer` it is where the answer begins, so the prompt's tokens are never predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch


def _targets(ids: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets: -100 at padding and, with `starts`, before each sequence's start."""
    keep = mask[:, 1:].bool()  # a view of `mask` when it is already bool: never in place
    if starts is not None:
        keep = keep & (torch.arange(1, ids.shape[1])[None, :] >= starts[:, None])
    return ids[:, 1:].masked_fill(~keep, -100)


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    starts: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and next-token targets (-100 where nothing to predict).

    `starts[i]` is the first position of sequence i that is a target (default: all but 0).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    first = None if starts is None else torch.as_tensor(list(starts), dtype=torch.long)
    return ids.to(device), mask.to(device), _targets(ids, mask, first).to(device)


class PackedSequences:
    """Sequences concatenated, with their offsets and lengths; batches as `pad_batch` pads."""

    def __init__(
        self, seqs: Sequence[Sequence[int]], pad_id: int, starts: Sequence[int] | None = None
    ) -> None:
        self.lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.tokens = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long)
        self.pad_id = pad_id
        self.starts = None if starts is None else torch.tensor(list(starts), dtype=torch.long)

    def targets_in(self, indices: torch.Tensor) -> int:
        """Next-token targets of these sequences: all but the first token, or from `starts`."""
        first = 1 if self.starts is None else self.starts[indices].clamp(min=1)
        return int((self.lengths[indices] - first).clamp(min=0).sum())

    def batch(
        self, indices: torch.Tensor, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = self.lengths[indices]
        positions = torch.arange(int(lengths.max()))
        mask = positions[None, :] < lengths[:, None]
        # Past its end a sequence reads its neighbour's tokens (masked), or for the last one
        # nothing: clamp so that no index leaves the buffer.
        where = (self.offsets[indices][:, None] + positions[None, :]).clamp(
            max=len(self.tokens) - 1
        )
        ids = torch.where(mask, self.tokens[where], self.pad_id)
        starts = None if self.starts is None else self.starts[indices]
        targets = _targets(ids, mask, starts)
        return ids.to(device), mask.long().to(device), targets.to(device)
