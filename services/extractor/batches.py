"""The batch loop: forward pass -> asynchronous copy to the host -> the writer thread.

On CUDA each batch's kept rows are copied into pinned host buffers without blocking, and
the writer waits for that copy's event, not the host: the device only ever waits for a
free pinned buffer, i.e. when the disk is slower than the model. Per-token outputs stay on
the device until the end for the same reason. Needs only torch (and transformers' model),
so the benchmark runs it on a bare GPU machine.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import GPT2LMHeadModel

from services.extractor.capture import Capture, layer_sites
from services.extractor.writer import QUEUE_DEPTH, LayerWriter
from shared.hidden import Probe


@dataclass
class TokenOutputs:
    """Per kept token: next-token entropy (nats), probability of the actual next token."""

    entropy: torch.Tensor
    next_token_prob: torch.Tensor
    next_token_id: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "entropy": self.entropy,
            "next_token_prob": self.next_token_prob,
            "next_token_id": self.next_token_id,
        }


def batch_bounds(probe: Probe, batch_size: int) -> list[tuple[int, int, int, int]]:
    """(first sample, end sample, first kept row, end kept row) of each batch.

    Samples are sorted by length in the probe, so consecutive samples make batches with
    little padding, and their kept tokens are one contiguous block of rows.
    """
    bounds = []
    samples = probe.token_sample.contiguous()
    for s0 in range(0, probe.n_samples, batch_size):
        s1 = min(s0 + batch_size, probe.n_samples)
        r0 = int(torch.searchsorted(samples, s0))
        r1 = int(torch.searchsorted(samples, s1))
        bounds.append((s0, s1, r0, r1))
    return bounds


class _PinnedBuffers:
    """Reusable pinned host buffers, one set per batch in flight."""

    def __init__(self, sites: list[list[str]], rows: int, d_model: int, dtype: torch.dtype) -> None:
        self._free: queue.Queue[list[dict[str, torch.Tensor]]] = queue.Queue()
        for _ in range(QUEUE_DEPTH + 1):
            self._free.put(
                [
                    {s: torch.empty(rows, d_model, dtype=dtype, pin_memory=True) for s in layer}
                    for layer in sites
                ]
            )

    def copy(
        self, layers: list[dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, torch.Tensor]], torch.cuda.Event, Callable[[], None]]:
        buffers = self._free.get()
        views = [
            {s: buffer[s][: t.shape[0]].copy_(t, non_blocking=True) for s, t in layer.items()}
            for buffer, layer in zip(buffers, layers, strict=True)
        ]
        event = torch.cuda.Event()
        event.record()
        return views, event, lambda: self._free.put(buffers)


def extract_batches(
    model: GPT2LMHeadModel,
    probe: Probe,
    writer: LayerWriter,
    *,
    sites: list[str],
    dtype: torch.dtype,
    batch_size: int,
    on_batch: Callable[[int], None] = lambda _tokens: None,
) -> TokenOutputs:
    """Run the whole probe through `model`, handing every batch's rows to `writer`.

    `on_batch` gets the number of real (unpadded) tokens of each batch, for progress.
    """
    device = next(model.parameters()).device
    n_layer, d_model = model.config.n_layer, model.config.n_embd
    capture = Capture(model, sites, dtype)
    bounds = batch_bounds(probe, batch_size)
    cuda = device.type == "cuda"
    most_rows = max(r1 - r0 for *_, r0, r1 in bounds)
    pinned = (
        _PinnedBuffers(layer_sites(n_layer, sites), most_rows, d_model, dtype) if cuda else None
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    out = TokenOutputs(
        torch.empty(probe.n_tokens, device=device),
        torch.empty(probe.n_tokens, device=device),
        torch.empty(probe.n_tokens, dtype=torch.int64, device=device),
    )
    with capture.hooks(), torch.inference_mode(), autocast:
        for s0, s1, r0, r1 in bounds:
            lengths = probe.lengths[s0:s1]
            ids = probe.input_ids[s0:s1, : int(lengths.max())].to(device, non_blocking=True)
            rows = (probe.token_sample[r0:r1] - s0).to(device)
            positions = probe.token_position[r0:r1].to(device)
            batch = capture.run(ids, lengths.to(device), rows, positions)
            out.entropy[r0:r1] = batch.entropy
            out.next_token_prob[r0:r1] = batch.next_token_prob
            out.next_token_id[r0:r1] = batch.next_token_id
            if pinned is not None:
                host, ready, written = pinned.copy(batch.layers)
                writer.put(r0, host, ready, written)
            else:
                writer.put(r0, batch.layers)
            on_batch(int(lengths.sum()))
    return out
