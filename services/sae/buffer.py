"""Shuffled SAE batches from an endless stream of activations, in bounded memory.

Activations arrive in chunks of whole sequences, so consecutive rows are neighbouring
tokens of the same text: trained on in that order, an SAE would see one context at a time.
The mixing buffer (the scheme of SAELens's activation store) holds `capacity` rows,
shuffles them, serves the first half as batches and refills exactly those rows from the
stream; every row therefore waits a random number of rounds and batches mix tokens from
many refills. Memory stays at `capacity` rows plus at most one chunk not yet used.

Refilling overlaps serving: while a round's batches are trained on, a producer thread
pulls the next rows from the stream (for activations, the model's forward passes) and
writes each into a row of this round whose batch has already been served (batches are
copies). Torch releases the GIL inside its ops, so on a CPU the forward passes run on a
second core beside the SAE step, and on a GPU the host queues them while the SAE step
runs. The rows land exactly where a refill after the round would put them, so the batches
are the same as without the thread, whatever its timing.

The buffer lives on the device the chunks come from, and the shuffle is drawn there by a
generator of that device, so on a GPU serving a batch costs the host no synchronisation;
the producer's writes go to the same stream after the reads they wait for.
Imports torch only (the benchmark uses it).
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator

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
        self.contents = torch.cat(list(self._pieces(capacity)))  # a copy: written in place
        self.generator = torch.Generator(self.contents.device).manual_seed(seed)
        #: Rows served and refilled per round: half the buffer, in whole batches.
        self.half = capacity // 2 // batch_size * batch_size

    def _pieces(self, n: int) -> Iterator[torch.Tensor]:
        """The next `n` rows of the stream, a chunk at a time; what is left of the last
        chunk waits its turn."""
        have = 0
        while have < n:
            chunk = self._rest if self._rest is not None else next(self.chunks)
            self._rest = None
            if have + len(chunk) > n:
                chunk, self._rest = chunk[: n - have], chunk[n - have :]
            have += len(chunk)
            yield chunk

    def batches(self, scale: float) -> Generator[torch.Tensor, None, None]:
        """Endless float32 batches of `batch_size` rows, multiplied by `scale`; `close` it
        to end the refill thread at once rather than when it is garbage-collected."""
        while True:
            order = torch.randperm(
                len(self.contents), generator=self.generator, device=self.contents.device
            )
            served = order[: self.half]
            refill = _Refill(self, served)
            try:
                for start in range(0, self.half, self.batch_size):
                    index = served[start : start + self.batch_size]
                    batch = self.contents[index].float().mul_(scale)
                    refill.free(start + self.batch_size)
                    yield batch
                refill.join()
            finally:
                refill.stop()


class _Refill:
    """One round's refill: a thread writing the stream's next rows into `served`, in order,
    each only once the consumer has `free`d (served) the row it overwrites."""

    def __init__(self, buffer: MixingBuffer, served: torch.Tensor) -> None:
        self.buffer = buffer
        self.served = served
        self.freed = 0
        self.stopped = False
        self.error: BaseException | None = None
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="mixing-buffer-refill", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            at = 0
            for piece in self.buffer._pieces(len(self.served)):
                end = at + len(piece)
                with self.ready:
                    while not (self.stopped or self.freed >= end):
                        self.ready.wait()
                    if self.stopped:
                        return
                contents = self.buffer.contents
                contents[self.served[at:end]] = piece.to(contents.device, contents.dtype)
                at = end
        except BaseException as err:  # handed to the consumer, which raises it in `join`
            self.error = err

    def free(self, rows: int) -> None:
        """The first `rows` of `served` have been read and may be overwritten."""
        with self.ready:
            self.freed = rows
            self.ready.notify()

    def join(self) -> None:
        """Wait for the round's rows; the producer's exception, if any, is raised here."""
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread early (the consumer stopped mid-round); no-op once it finished."""
        with self.ready:
            self.stopped = True
            self.ready.notify()
        self.thread.join()
