"""Shuffled SAE batches from an endless stream of activations, in bounded memory.

Activations arrive in chunks of whole sequences, so consecutive rows are neighbouring
tokens of the same text: trained on in that order, an SAE would see one context at a time.
The mixing buffer (the scheme of SAELens's activation store) holds `capacity` rows,
shuffles them, serves the first half as batches and refills exactly those rows from the
stream; every row therefore waits a random number of rounds and batches mix tokens from
many refills. Memory stays at `capacity` rows plus at most one chunk not yet used.

The buffer lives on the device the chunks come from, and the shuffle is drawn there by a
generator of that device, so on a GPU serving a batch costs the host no synchronisation.
Imports torch only (the benchmark uses it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MixingBuffer:
    """`capacity` rows of activations, filled on creation; `batches` serves them endlessly."""

    def __init__(
        self, chunks: Iterator[torch.Tensor], capacity: int, batch_size: int, seed: int
    ) -> None:
        if capacity < 2 * batch_size:
            raise ValueError(f"a buffer of {capacity} rows cannot serve half of itself in "
                             f"batches of {batch_size}")  # fmt: skip
        self.chunks = chunks
        self.batch_size = batch_size
        self._rest: torch.Tensor | None = None
        self.contents = self._take(capacity)
        self.generator = torch.Generator(self.contents.device).manual_seed(seed)
        #: Rows served and refilled per round: half the buffer, in whole batches.
        self.half = capacity // 2 // batch_size * batch_size

    def _take(self, n: int) -> torch.Tensor:
        """The next `n` rows of the stream; what is left of the last chunk waits its turn."""
        parts: list[torch.Tensor] = []
        have = 0
        while have < n:
            chunk = self._rest if self._rest is not None else next(self.chunks)
            self._rest = None
            if have + len(chunk) > n:
                chunk, self._rest = chunk[: n - have], chunk[n - have :]
            parts.append(chunk)
            have += len(chunk)
        return torch.cat(parts)  # a copy even of one part: the buffer is written in place

    def batches(self, scale: float) -> Iterator[torch.Tensor]:
        """Endless float32 batches of `batch_size` rows, multiplied by `scale`."""
        while True:
            order = torch.randperm(
                len(self.contents), generator=self.generator, device=self.contents.device
            )
            served = order[: self.half]
            for start in range(0, self.half, self.batch_size):
                index = served[start : start + self.batch_size]
                yield self.contents[index].float().mul_(scale)
            self.contents[served] = self._take(self.half).to(self.contents.dtype)
