"""What the extractor writes, and how every later stage reads it.

One probe set per run (`extract/probe.safetensors`) fixes which tokens are looked at; each
checkpoint's extraction (`extract/step-<N>/`) stores, for exactly those tokens and in the
probe's order, one file per layer:

- `layer-<LL>.safetensors`: `resid` [tokens, d_model], the residual stream (layer 0 after
  the embeddings, layer l after block l, *before* the final layer norm), plus, for blocks
  (l >= 1), any extra site asked for: `attn_out` (attention output of block l), `mlp_out`
  (MLP output of block l), `resid_mid` (residual stream between them).
- `tokens.safetensors`: per kept token, `entropy` (nats) of the next-token distribution,
  `next_token_prob` (probability given to the token that actually follows; NaN at the
  last position of a sequence, where nothing follows) and `next_token_id` (-1 there).
- `index.json`: layer count, sites, d_model, dtype and token count, so readers need not
  open tensors to plan; then `DONE`.

Row i of every file is token i of the probe, so OT, SAE and detection compare the same
tokens across layers and checkpoints without any bookkeeping of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from shared import layout, stage_registry
from shared.errors import ArtifactNotFound, DriftlabError, InputMissing
from shared.store import Store

FORMAT = 1
RESID = "resid"
SITES = ("attn_out", "mlp_out", "resid_mid")
#: token_role values: plain text (no question/answer split), question, answer.
ROLE_TEXT, ROLE_QUESTION, ROLE_ANSWER = 0, 1, 2
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


class ExtractionError(DriftlabError):
    """An extraction that is missing, inconsistent, or holds NaN/inf values."""


@dataclass(frozen=True)
class Probe:
    """The fixed probe set: the sequences run through the model and the tokens kept.

    `input_ids` is [samples, max_len] padded with `pad_id` beyond `lengths`; the kept
    tokens are (`token_sample`, `token_position`) pairs, all inside their sequence.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    token_sample: torch.Tensor
    token_position: torch.Tensor
    token_id: torch.Tensor
    token_role: torch.Tensor
    example_ids: list[str]
    pad_id: int
    meta: dict[str, str]

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.token_sample.shape[0])

    @property
    def digest(self) -> str:
        """Digest of what defines the probe; extractions of different probes never mix."""
        return self.meta["digest"]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "lengths": self.lengths,
            "token_sample": self.token_sample,
            "token_position": self.token_position,
            "token_id": self.token_id,
            "token_role": self.token_role,
        }

    def metadata(self) -> dict[str, str]:
        return {
            **self.meta,
            "format": str(FORMAT),
            "pad_id": str(self.pad_id),
            "example_ids": json.dumps(self.example_ids),
        }


@dataclass(frozen=True)
class ExtractIndex:
    """`extract/step-<N>/index.json`: what one checkpoint's extraction holds."""

    step: int
    n_layers: int
    d_model: int
    n_tokens: int
    dtype: str
    sites: list[str]
    probe_digest: str

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}


def _extract_command(run_id: str, store: Store, step: int | None = None) -> str:
    return stage_registry.EXTRACT.command(run_id, store.url, step)


def load_probe(store: Store, run_id: str) -> Probe:
    key = layout.probe_key(run_id)
    try:
        tensors, meta = store.get_tensors(key)
    except ArtifactNotFound:
        raise InputMissing(
            f"run {run_id} has no probe set ({store.url_of(key)}): "
            f"run `{_extract_command(run_id, store)}` first"
        ) from None
    if meta.get("format") != str(FORMAT):
        raise ExtractionError(
            f"{store.url_of(key)} has probe format {meta.get('format')!r}, expected {FORMAT}: "
            "rerun the extractor with --force"
        )
    rest = {k: v for k, v in meta.items() if k not in ("format", "pad_id", "example_ids")}
    return Probe(
        input_ids=tensors["input_ids"],
        lengths=tensors["lengths"],
        token_sample=tensors["token_sample"],
        token_position=tensors["token_position"],
        token_id=tensors["token_id"],
        token_role=tensors["token_role"],
        example_ids=list(json.loads(meta["example_ids"])),
        pad_id=int(meta["pad_id"]),
        meta=rest,
    )


def load_index(store: Store, run_id: str, step: int) -> ExtractIndex:
    if not store.exists(layout.extract_done_key(run_id, step)):
        raise InputMissing(
            f"checkpoint step {step} of run {run_id} has not been extracted: "
            f"run `{_extract_command(run_id, store, step)}` first"
        )
    data = store.get_json(layout.extract_index_key(run_id, step))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExtractionError(
            f"{store.url_of(layout.extract_index_key(run_id, step))} is not an index of "
            f"format {FORMAT}: rerun the extractor for step {step} with --force"
        )
    fields = {k: v for k, v in data.items() if k != "format"}
    return ExtractIndex(**fields)


def load_hidden(
    store: Store, run_id: str, step: int, layer: int, site: str = RESID
) -> torch.Tensor:
    """[tokens, d_model] hidden states of one layer at one checkpoint, as stored.

    Refuses NaN/inf with a message naming the step, layer and site: every consumer would
    otherwise turn them into silent NaN results far from the cause.
    """
    key = layout.extract_layer_key(run_id, step, layer)
    try:
        tensors, _ = store.get_tensors(key)
    except ArtifactNotFound:
        raise InputMissing(
            f"layer {layer} of checkpoint step {step} of run {run_id} was not extracted "
            f"({store.url_of(key)}): run `{_extract_command(run_id, store, step)}`"
        ) from None
    if site not in tensors:
        raise ExtractionError(
            f"{store.url_of(key)} has no site {site!r} (it holds {', '.join(sorted(tensors))});"
            " add it to extract.sites and rerun the extractor"
        )
    hidden = tensors[site]
    check_finite(hidden, f"hidden states ({site}) of run {run_id}, step {step}, layer {layer}")
    return hidden


def load_token_outputs(store: Store, run_id: str, step: int) -> dict[str, torch.Tensor]:
    """`entropy`, `next_token_prob`, `next_token_id` per probe token at one checkpoint."""
    key = layout.extract_tokens_key(run_id, step)
    try:
        tensors, _ = store.get_tensors(key)
    except ArtifactNotFound:
        raise InputMissing(
            f"checkpoint step {step} of run {run_id} has no per-token outputs "
            f"({store.url_of(key)}): run `{_extract_command(run_id, store, step)}`"
        ) from None
    return tensors


def check_finite(tensor: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ExtractionError(f"{what}: {bad} NaN/inf values; the checkpoint has diverged")
