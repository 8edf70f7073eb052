"""The report's activation explorer: what one would otherwise open a notebook for.

For every extracted layer and checkpoint: statistics of the hidden states, and, where the
layer has an SAE, its most active features with the probe tokens that excite them most (in
context). The SAE was trained at one checkpoint (`sae.step`); applying it at the others
shows which of its features already exist earlier in training and which appear late.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shared import hidden, layout, stage_registry
from shared.errors import DriftlabError
from shared.spec import RunSpec
from shared.steps import extracted_steps
from shared.store import Store

TOP_FEATURES = 5
TOP_TOKENS = 5
CONTEXT_TOKENS = 6


def _decoder(spec: RunSpec) -> tuple[Callable[[list[int]], str], str | None]:
    """Token ids -> text, or "#id" when the tokenizer cannot be loaded (and why)."""
    from shared.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(spec.data.tokenizer)
    except (DriftlabError, OSError) as err:
        return (lambda ids: " ".join(f"#{i}" for i in ids)), f"tokenizer unavailable: {err}"
    return tokenizer.decode, None


def activation_stats(states: torch.Tensor) -> dict[str, float]:
    x = states.float()
    norms = x.norm(dim=1)
    return {
        "tokens": int(x.shape[0]),
        "d_model": int(x.shape[1]),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "max_abs": float(x.abs().max()),
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()) if norms.numel() > 1 else 0.0,
        "norm_max": float(norms.max()),
    }


def top_features(
    features: torch.Tensor, probe: hidden.Probe, decode: Callable[[list[int]], str]
) -> list[dict[str, Any]]:
    """The TOP_FEATURES features with the largest mean activation, each with its top tokens."""
    mean = features.mean(0)
    chosen = torch.argsort(mean, descending=True)[:TOP_FEATURES]
    out = []
    for feature in chosen.tolist():
        column = features[:, feature]
        if float(column.max()) <= 0:
            continue
        order = torch.argsort(column, descending=True)[:TOP_TOKENS]
        tokens = []
        for row in order.tolist():
            if float(column[row]) <= 0:
                break
            sample, position = int(probe.token_sample[row]), int(probe.token_position[row])
            ids = probe.input_ids[sample, max(0, position - CONTEXT_TOKENS) : position]
            tokens.append(
                {
                    "token": decode([int(probe.token_id[row])]),
                    "context": decode([int(i) for i in ids]),
                    "activation": float(column[row]),
                    "example": probe.example_ids[sample],
                }
            )
        out.append(
            {
                "feature": int(feature),
                "mean_activation": float(mean[feature]),
                "frequency": float((column > 0).float().mean()),
                "top_tokens": tokens,
            }
        )
    return out


def explore(store: Store, run_id: str, spec: RunSpec, device: str) -> dict[str, Any]:
    """Per checkpoint and layer: activation statistics and, with an SAE, its top features."""
    steps = extracted_steps(store, run_id)
    if not steps:
        command = stage_registry.EXTRACT.command(run_id, store.url)
        return {"absent": f"no extraction: run the extractor (`{command}`)"}
    probe = hidden.load_probe(store, run_id)
    n_layers = hidden.load_index(store, run_id, steps[-1]).n_layers
    saes, sae_note = _load_saes(store, run_id, n_layers, device)
    decode, tokenizer_note = _decoder(spec) if saes else ((lambda ids: ""), None)
    cells: dict[str, Any] = {}
    for step in steps:
        for layer in range(hidden.load_index(store, run_id, step).n_layers):
            states = hidden.load_hidden(store, run_id, step, layer)
            cell: dict[str, Any] = {"stats": activation_stats(states)}
            if layer in saes:
                with torch.no_grad():
                    features = saes[layer].features(states.to(device)).float().cpu()
                cell["features"] = top_features(features, probe, decode)
            cells[f"{step}/{layer}"] = cell
    return {
        "steps": steps,
        "layers": list(range(n_layers)),
        "sae_layers": sorted(saes),
        "notes": [note for note in (sae_note, tokenizer_note) if note],
        "cells": cells,
    }


def _load_saes(
    store: Store, run_id: str, n_layers: int, device: str
) -> tuple[dict[int, Any], str | None]:
    done = [layer for layer in range(n_layers) if store.exists(layout.sae_done_key(run_id, layer))]
    if not done:
        command = stage_registry.SAE.command(run_id, store.url)
        return {}, f"no SAE has been trained: run `{command}` for features"
    from shared.sae.artifacts import load_sae

    saes = {layer: load_sae(store, run_id, layer, device).eval() for layer in done}
    return saes, None
