"""Where one layer's SAE gets its training activations and its held-out judges (`sae.source`).

- `stream` (default): the checkpoint runs over the run's *training* sequences, pass after
  pass in a new seeded order, and the layer's activations reach the SAE through a mixing
  buffer of `sae.buffer_tokens` rows (`services.sae.buffer`). A training set that fits in
  the buffer is run once and its activations reshuffled every pass instead: the model is
  in eval mode, so every further pass would compute the very same numbers. The metrics
  use at least `sae.eval_tokens` tokens of whole sequences of the *eval* split, which
  never shares a text with training; those sequences are also where CE-loss-recovered is
  measured. The probe's tokens are not used: they follow `extract.token_policy` (answers
  only, one token per sequence...), a different mix from the tokens trained on.
- `probe`: the extracted probe tokens of the checkpoint. The probe's *sequences* are split
  (`holdout_fraction`, seeded), so the held-out tokens and the sequences used for
  CE-loss-recovered are the same unseen text. With one sequence, or `holdout_fraction: 0`,
  metrics fall back to the training tokens and `sae.json` says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.sae.batches import Batches, input_scale, place
from services.sae.buffer import MixingBuffer
from services.sae.stream import (
    Sequences,
    all_activations,
    endless_chunks,
    first_tokens,
    generating_model,
)
from shared.data import Example, load_task, tokenize_examples
from shared.errors import DriftlabError
from shared.hidden import Probe, load_hidden, load_probe
from shared.spec import RunSpec, SAESpec
from shared.store import Store
from shared.tokenizer import load_tokenizer


class SAETrainingError(DriftlabError):
    """SAE training cannot go on: too little data, or a diverging loss."""


@dataclass(frozen=True)
class Source:
    """Endless scaled training batches, their statistics, and the held-out data."""

    batches: Iterable[torch.Tensor]
    #: Multiplier giving the training activations unit mean squared norm; their mean.
    scale: float
    mean: torch.Tensor
    #: Tokens of one pass over the training data (what `sae.epochs` counts).
    epoch_tokens: int
    #: [tokens, d_model] held-out hidden states for the reconstruction metrics.
    held_out: torch.Tensor
    #: The sequences those tokens come from, for CE-loss-recovered.
    eval_sequences: Sequences
    #: What `sae.json` says about the training data ("training") and the judges ("evaluation").
    training: dict[str, Any]
    evaluation: dict[str, Any]


def _check_batch(tokens: int, spec: SAESpec, where: str, more: str) -> None:
    if tokens < spec.batch_size:
        raise SAETrainingError(
            f"{where}: only {tokens} training tokens for sae.batch_size {spec.batch_size}; "
            f"lower sae.batch_size or {more}"
        )


def stream_source(
    spec: RunSpec, model: nn.Module, layer: int, device: torch.device, where: str
) -> Source:
    """Activations of the training split streamed from `model`; the eval split judges."""
    sae = spec.sae
    task = load_task(spec.data)
    tokenizer = load_tokenizer(spec.data.tokenizer)

    def sequences(examples: list[Example]) -> Sequences:
        return Sequences.pad(
            tokenize_examples(examples, tokenizer, spec.data.max_length), tokenizer.pad_id
        )

    train = sequences(task.train)
    _check_batch(train.n_tokens, sae, where, "use a larger training set")
    generator = generating_model(model, sae.stream_dtype)
    batches: Iterable[torch.Tensor]
    if train.n_tokens <= sae.buffer_tokens:
        data = all_activations(generator, layer, train)
        rows = torch.arange(len(data))
        scale, mean = input_scale(data, rows)
        batches = Batches(data, rows, sae.batch_size, device, scale, sae.seed)
        mode = "resident"
    else:
        chunks = endless_chunks(generator, layer, train, sae.buffer_tokens // 4, sae.seed)
        buffer = MixingBuffer(chunks, sae.buffer_tokens, sae.batch_size, sae.seed)
        scale, mean = input_scale(buffer.contents, torch.arange(len(buffer.contents)))
        batches = buffer.batches(scale)
        mode = "buffered"
    judges = first_tokens(sequences(task.eval), sae.eval_tokens, sae.seed)
    return Source(
        batches=batches,
        scale=scale,
        mean=mean,
        epoch_tokens=train.n_tokens,
        held_out=all_activations(model, layer, judges),
        eval_sequences=judges,
        training={
            "source": "stream",
            "dataset": task.name,
            "split": "train",
            "mode": mode,
            "dtype": sae.stream_dtype,
            "buffer_tokens": sae.buffer_tokens,
            "sequences": len(train),
        },
        evaluation={
            "held_out": True,
            "split": "eval",
            "samples": len(judges),
            "tokens": judges.n_tokens,
            "requested_tokens": sae.eval_tokens,
        },
    )


def probe_source(
    store: Store, run_id: str, step: int, layer: int, spec: SAESpec, device: torch.device,
    where: str,
) -> Source:  # fmt: skip
    """The extracted probe tokens of checkpoint `step`, a share of its sequences held out."""
    probe = load_probe(store, run_id)
    data = place(load_hidden(store, run_id, step, layer), device)
    if probe.n_tokens != len(data):
        raise SAETrainingError(
            f"{where}: the probe has {probe.n_tokens} tokens but the extraction "
            f"{len(data)}; rerun the extractor with --force"
        )
    train_rows, eval_rows, eval_samples, held_out = holdout_split(
        probe, spec.holdout_fraction, spec.seed
    )
    _check_batch(len(train_rows), spec, where, "extract more tokens (extract.probe_samples)")
    scale, mean = input_scale(data, train_rows)
    return Source(
        batches=Batches(data, train_rows, spec.batch_size, device, scale, spec.seed),
        scale=scale,
        mean=mean,
        epoch_tokens=len(train_rows),
        held_out=data[eval_rows.to(data.device)],
        eval_sequences=Sequences(probe.input_ids[eval_samples], probe.lengths[eval_samples]),
        training={"source": "probe", "split": "probe"},
        evaluation={
            "held_out": held_out,
            "split": "probe",
            "samples": len(eval_samples),
            "tokens": len(eval_rows),
        },
    )


def holdout_split(
    probe: Probe, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(training token rows, evaluation token rows, evaluation samples, held out?)."""
    n = probe.n_samples
    n_held = 0 if fraction == 0 else min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    is_held = torch.zeros(n, dtype=torch.bool)
    is_held[order[:n_held]] = True
    token_held = is_held[probe.token_sample.long()]
    train_rows = torch.nonzero(~token_held).flatten()
    if n_held == 0:
        return train_rows, train_rows, torch.arange(n), False
    held_rows = torch.nonzero(token_held).flatten()
    return train_rows, held_rows, torch.nonzero(is_held).flatten(), True
